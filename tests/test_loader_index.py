"""The loader on the index: epochs, each rank reading only its own samples, worker processes, and
bad input that must be counted (not crash, not re-counted, not escape the image root)."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lingshu_fast.config import DataConfig
from lingshu_fast.data.dataset import Part, open_parts
from lingshu_fast.data.formats import DataError
from lingshu_fast.data.loader import PackedLoader, resolve_max_steps
from lingshu_fast.data.template import ChatTemplate
from lingshu_fast.data.tokenizer import load_tokenizer
from lingshu_fast.parallel.spawn import spawn


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def _chat(user, answer, images=()):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                       "images": list(images)})


def _text_data(folder, n=40):
    path = folder / "text.jsonl"
    path.write_text("\n".join(_chat(f"question {k} " + "word " * (k % 7), f"answer {k}") for k in range(n)) + "\n")
    return path


def _stream_ids(loader):
    return [mb.sample_ids for mb in loader]


def test_epochs_visit_every_sample_twice_in_two_orders(tmp_path, tok):
    """train.epochs=2: the stream holds every sample exactly twice, the two epochs in different
    packing orders (a new plan from the seed), and then ends; the step count a run derives from it
    (train.max_steps: null) covers it all, and a larger max_steps is cut to it."""
    path = _text_data(tmp_path)
    cfg = DataConfig(train=[str(path)], max_tokens_per_microbatch=96, max_length=96, shuffle_window=16, num_workers=0)
    loader = PackedLoader(cfg.train, tok, cfg, seed=11, epochs=2)
    per_epoch = [loader.microbatches_in_epoch(0), loader.microbatches_in_epoch(1)]
    stream = _stream_ids(loader)
    assert len(stream) == sum(per_epoch) == loader.total_microbatches()
    first, second = stream[:per_epoch[0]], stream[per_epoch[0]:]
    assert sorted(i for mb in first for i in mb) == list(range(40)) == sorted(i for mb in second for i in mb)
    assert [i for mb in first for i in mb] != [i for mb in second for i in mb]
    assert resolve_max_steps(None, len(stream) // 2, epochs=2) == len(stream) // 2
    assert resolve_max_steps(10**6, len(stream) // 2, epochs=2) == len(stream) // 2
    assert resolve_max_steps(3, len(stream) // 2, epochs=2) == 3
    with pytest.raises(DataError, match="no full step"):
        resolve_max_steps(None, 0, epochs=1)


def _train_one_epoch(dims, path, root):
    from lingshu_fast.config import load_config
    from lingshu_fast.train.loop import train

    rows = {}
    for max_steps in ("12", "null"):
        run = f"{root}/run_{max_steps}"
        train(load_config("tiny-sft", [f"run.dir={run}", f"data.train=[{path}]", "train.epochs=1",
                                       f"train.max_steps={max_steps}", "train.global_microbatches=1", "data.pack=false",
                                       "run.progress=false", "checkpoint.every=0"]), dims)
        with open(f"{run}/metrics.jsonl") as f:
            rows[max_steps] = [json.loads(line) for line in f]
    return rows


def test_a_run_stops_at_the_end_of_its_epochs(tmp_path):
    """4 samples, one per step, train.epochs=1 and train.max_steps=12: the run makes 4 steps (the
    key used to be read nowhere, and the data cycled for 12), and with max_steps null as many."""
    path = tmp_path / "four.jsonl"
    path.write_text("\n".join(_chat(f"q{k}", f"a{k}") for k in range(4)) + "\n")
    for rows in spawn(_train_one_epoch, 1, str(path), str(tmp_path))[0].values():
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert all(r["data_wait_s"] >= 0 and r["data_wait_s"] <= r["step_time_s"] for r in rows)


def test_each_rank_reads_only_its_own_samples(tmp_path, tok, monkeypatch):
    """At scale no rank may read the whole data set: start-up reads no record, and each rank reads
    exactly the records of its own micro-batches."""
    path = _text_data(tmp_path)
    cfg = DataConfig(train=[str(path)], max_tokens_per_microbatch=96, max_length=96, num_workers=0)
    reads = []
    real = Part.read_sample
    monkeypatch.setattr(Part, "read_sample", lambda self, k: reads.append(k) or real(self, k))
    ranks = [PackedLoader(cfg.train, tok, cfg, seed=2, dp_rank=r, dp_size=2, epochs=1) for r in range(2)]
    assert reads == []
    for rank in ranks:
        reads.clear()
        own = [i for mb in rank for i in mb.sample_ids]
        assert sorted(reads) == sorted(own)


def test_worker_processes_give_the_in_process_stream(tmp_path, tok):
    """Process workers (several, results taken in order) give the very micro-batches of building in
    the trainer, and `take_step` times the wait for them."""
    from lingshu_fast.data.demo_data import build_demo_dataset

    demo = build_demo_dataset(tmp_path / "demo")
    cfg = DataConfig(train=[str(demo["instruct"])], max_pixels=84 * 84, max_tokens_per_microbatch=160,
                     max_length=160, num_workers=0)
    local = PackedLoader(cfg.train, tok, cfg, seed=4, epochs=1)
    workers = PackedLoader(cfg.train, tok, dataclasses.replace(cfg, num_workers=2), seed=4, epochs=1, device="cpu")
    assert workers._pool is not None  # started at construction: warm before the first step
    expected = list(local)
    got = []
    while True:
        step = workers.take_step(3)
        assert workers.last_wait_s >= 0.0
        if not step:
            break
        got += step
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert a.sample_ids == b.sample_ids
        assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "labels", "position_ids",
                                                                          "cu_seqlens"))
        assert (a.pixel_values is None) == (b.pixel_values is None)
        assert a.pixel_values is None or np.array_equal(a.pixel_values, b.pixel_values)
    workers.close()


def test_non_utf8_line_is_a_bad_record_and_bom_is_accepted(tmp_path, tok):
    """One undecodable byte used to kill the run with a UnicodeDecodeError traceback, and a BOM cost
    the first (good) line: now the BOM is dropped and the bad line is `file:line: ... not UTF-8`."""
    path = tmp_path / "mixed.jsonl"
    good = [_chat(f"q{k}", f"a{k}").encode() for k in range(3)]
    path.write_bytes(b"\xef\xbb\xbf" + good[0] + b"\n" + good[1][:-5] + b"\xff\xfe" + good[1][-5:] + b"\n" + good[2] + b"\n")
    cfg = DataConfig(train=[str(path)], max_tokens_per_microbatch=64, max_length=64, pack=False, num_workers=0)
    for scanner in ("auto", "python"):  # the native scanner hands such lines to Python: same record
        part = open_parts(cfg.train, ChatTemplate(tok), cfg, index_dir=str(tmp_path / scanner), backend=scanner)[0]
        assert part.num_records == 2 and [b[:2] for b in part.bad_records()] == [(f"{path}:2", "bad_json")]
    loader = PackedLoader(cfg.train, tok, cfg)
    assert len(loader.samples) == 2 and loader.skipped_startup["bad_json"] == 1
    assert sorted(loader.samples[i].source for i in range(2)) == [f"{path}:1", f"{path}:3"]
    strict = DataConfig(train=[str(path)], max_tokens_per_microbatch=64, max_length=64, strict=True, num_workers=0)
    with pytest.raises(DataError, match=rf"{path}:2: bad_json: not UTF-8: byte 0xff"):
        PackedLoader(strict.train, tok, strict)


def test_image_paths_are_confined_to_the_image_root(tmp_path, tok):
    """With data.image_root set, `../`, absolute and `~` paths that leave it are bad records
    (image_outside_root), not files the trainer reads; data.confine_images=false allows them."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    picture = np.full((56, 56), 90, np.uint8)
    Image.fromarray(picture).save(root / "sub" / "in.png")
    Image.fromarray(picture).save(tmp_path / "secret.png")
    home = tmp_path / "home"
    home.mkdir()
    Image.fromarray(picture).save(home / "h.png")
    lines = [_chat("<image>a", "b", ["sub/in.png"]), _chat("<image>a", "b", ["sub/../sub/in.png"]),
             _chat("<image>a", "b", ["../secret.png"]), _chat("<image>a", "b", [str(tmp_path / "secret.png")]),
             _chat("<image>a", "b", ["~/h.png"])]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    os.environ["HOME"], old_home = str(home), os.environ.get("HOME")
    try:
        cfg = DataConfig(train=[str(path)], image_root=str(root), max_pixels=56 * 56, max_tokens_per_microbatch=128,
                         max_length=128, pack=False, num_workers=0)
        loader = PackedLoader(cfg.train, tok, cfg, epochs=1)
        assert loader.skipped_startup["image_outside_root"] == 3 and len(loader.samples) == 2
        opened = dataclasses.replace(cfg, confine_images=False)
        assert len(PackedLoader(opened.train, tok, opened, epochs=1).samples) == 5
    finally:
        os.environ["HOME"] = old_home


def test_a_file_without_usable_samples_is_a_one_line_error(tmp_path, tok):
    """A data file none of whose records is usable (next to a good one) used to train silently on
    the rest; it is now one error naming the file and the reasons, printed without a traceback."""
    good = _text_data(tmp_path, n=8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_chat("<image>q", "a", ["missing.png"]) + "\n{broken\n")
    cfg = DataConfig(train=[str(good), str(bad)], max_tokens_per_microbatch=96, max_length=96, num_workers=0)
    with pytest.raises(DataError, match=rf"{bad}: no usable sample among its 2 records .*missing_image"):
        PackedLoader(cfg.train, tok, cfg)
    proc = subprocess.run([sys.executable, "-m", "lingshu_fast.cli", "train", "tiny-sft", f"run.dir={tmp_path / 'run'}",
                           f"data.train=[{good},{bad}]", "run.progress=false"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lingshu-fast:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "no usable sample" in errors[0]


def test_each_bad_record_is_counted_once_over_epochs(tmp_path, tok):
    """A truncated image (its header reads fine) fails every epoch: `skipped_samples` counts it once
    (it used to grow by one per epoch), `skipped_events` every time it was met."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    lines = [_chat("<image>x", "y", ["cut.png"]), _chat("<image>x", "y", ["full.png"]), _chat("t", "u"), "{bad"]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(train=[str(path)], max_pixels=56 * 56, max_tokens_per_microbatch=128, max_length=128,
                     pack=False, num_workers=0)
    loader = PackedLoader(cfg.train, tok, cfg, epochs=3)
    assert len(list(loader)) == 9
    assert loader.skip_metrics() == {"skipped_samples": 2, "skipped_events": 4}  # bad JSON once + cut.png x3
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = PackedLoader(cfg.train, tok, cfg, epochs=4)
    resumed.load_state_dict(state)
    assert len(list(resumed)) == 3 and resumed.skip_metrics() == {"skipped_samples": 2, "skipped_events": 5}


class _RecordingStager:
    """Stands for the CUDA stager (a side stream) and records when each micro-batch was staged."""

    def __init__(self):
        self.stream = object()
        self.log = []

    def stage(self, mb):
        self.log.append(("stage", tuple(mb.sample_ids)))
        return mb

    def ready(self, handle):
        self.log.append(("ready", tuple(handle.sample_ids)))
        return handle


def test_next_microbatch_is_staged_during_the_step(tmp_path, tok):
    """With a device stream, `take_step` returns the step's micro-batches and, when the next one is
    already built, starts its host-to-device copy before returning, so the copy overlaps the step."""
    path = _text_data(tmp_path)
    cfg = DataConfig(train=[str(path)], max_tokens_per_microbatch=96, max_length=96, num_workers=1)
    loader = PackedLoader(cfg.train, tok, cfg, seed=3, epochs=1)
    loader._stager = stager = _RecordingStager()
    first = loader.take_step(2)
    assert [e for e in stager.log[:4]] == [("stage", tuple(first[0].sample_ids)), ("ready", tuple(first[0].sample_ids)),
                                          ("stage", tuple(first[1].sample_ids)), ("ready", tuple(first[1].sample_ids))]
    loader._pending[0][1].result()  # the worker has built the next one
    loader.take_step(0)  # nothing taken: only the look-ahead
    assert stager.log[-1][0] == "stage" and len(stager.log) == 5  # its copy starts before the next step
    second = loader.take_step(1)
    assert stager.log[4] == ("stage", tuple(second[0].sample_ids)) and stager.log[5] == ("ready", stager.log[4][1])
    loader.close()


_KILLED_TRAINER = """
import os, signal, sys
from lingshu_fast.config import DataConfig
from lingshu_fast.data.loader import PackedLoader
from lingshu_fast.data.tokenizer import load_tokenizer
from lingshu_fast.parallel.spawn import spawn
cfg = DataConfig(train=[sys.argv[1]], max_tokens_per_microbatch=64, max_length=64, num_workers=2)
loader = PackedLoader(cfg.train, load_tokenizer("tiny"), cfg, seed=0, epochs=1, device="cpu")
next(loader)  # the workers are up and have built
print(" ".join(str(pid) for pid in loader._pool._pool._processes), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\\nState:\\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def _loader_left_open(dims, path):
    from lingshu_fast.data.tokenizer import load_tokenizer

    cfg = DataConfig(train=[path], max_tokens_per_microbatch=96, max_length=96, num_workers=1)
    loader = PackedLoader(cfg.train, load_tokenizer("tiny"), cfg, seed=0, epochs=1)
    first = next(iter(loader))  # the worker pool is running now; the loader is never closed
    return first.num_tokens


def test_a_rank_exits_with_its_loader_left_open(tmp_path, monkeypatch):
    """A rank that is a multiprocessing child joins its children at exit, and the data workers wait for
    it to be gone: a loader its owner never closed used to hang that exit until the rank was killed.
    The pool's exit finalizer shuts it down first (spawn() raises on a rank that cannot exit)."""
    from lingshu_fast.parallel import spawn as spawn_mod

    monkeypatch.setattr(spawn_mod, "_EXIT_GRACE_S", 10.0)
    assert spawn(_loader_left_open, 1, str(_text_data(tmp_path)))[0] > 0


def test_workers_exit_when_the_trainer_is_killed(tmp_path):
    """A SIGKILLed trainer (OOM kill, preemption) must not leave its data workers running: they block
    on a queue whose write end they hold, so without the pid watch they (and the fork server they keep
    alive) stayed for ever, each holding its memory. This test fails without the watch."""
    import time

    data = _text_data(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _KILLED_TRAINER, str(data)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 30
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(p) for p in pids), f"workers {pids} outlived their killed trainer"
