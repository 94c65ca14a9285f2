"""Atomic checkpoints (lingshu_fast.train.checkpoint): round trip, crashes, keep-N, ranks, background saves.

The tensors of a real checkpoint come from `state_io` (tested with the trainer in test_resharding.py);
here a job writes one safetensors file per rank, which is all the protocol sees."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lingshu_fast.parallel.spawn import spawn
from lingshu_fast.train import checkpoint as ck
from lingshu_fast.train.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    SaveJob,
    capture_rng_state,
    find_latest,
    load_checkpoint,
    restore_rng_state,
)


def _weights(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(11, 4), "model.norm.weight": torch.ones(4)}


def _job(step, seed=0, rank=0, weights=None, rng=None) -> SaveJob:
    def write(folder: Path) -> list:
        from safetensors.torch import save_file

        path = folder / "model" / f"part-rank{rank:05d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(weights if weights is not None else _weights(seed), str(path))
        return [path]

    rank_state = {"rng": rng if rng is not None else capture_rng_state(), "loader": {"cursor": step * 10 + rank}}
    global_state = {"step": step, "sched": {"last_epoch": step}, "loader": {"epoch": 1, "order": torch.arange(5)},
                    "extra": {"stage": 3, "config": {"lr": 1e-5}}} if rank == 0 else None
    return SaveJob(step=step, write_tensors=write, global_state=global_state, rank_state=rank_state)


def _save(run_dir, step, seed=0, keep=2, rank=0, world=1, **job):
    writer = CheckpointWriter(run_dir, rank=rank, world=world, keep=keep)
    writer.save(_job(step, seed, rank, **job))
    return Path(run_dir) / "checkpoints" / ck.step_dir_name(step)


def _weights_of(path: Path, rank: int = 0) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model" / f"part-rank{rank:05d}.safetensors"))


def test_round_trip_and_rng_restore(tmp_path):
    """Pins: every piece comes back equal, the state files load under weights_only=True, and
    restoring the RNG state replays python, numpy and torch draws exactly."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    rng = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    path = _save(tmp_path, 7, rng=rng)
    got = load_checkpoint(find_latest(tmp_path))
    assert got["step"] == 7 and got["folder"] == path and got["state"]["sched"] == {"last_epoch": 7}
    assert torch.equal(got["state"]["loader"]["order"], torch.arange(5)) and got["rank_state"]["loader"] == {"cursor": 70}
    for name, tensor in _weights(0).items():
        assert torch.equal(_weights_of(path)[name], tensor)
    restore_rng_state(got["rank_state"]["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    assert sorted(got["manifest"]["files"]) == ["model/part-rank00000.safetensors", "rank_state/rank00000.pt",
                                                "state.pt"]


def test_keep_n_and_resave_same_step(tmp_path):
    """Pins: only the `keep` newest checkpoints stay (disk fills otherwise), and saving a step that
    already exists (a resume at that step) replaces it instead of failing on the rename."""
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000004", "step_000005"]
    _save(tmp_path, 5, seed=1, keep=2)
    got = load_checkpoint(find_latest(tmp_path))
    assert torch.equal(_weights_of(got["folder"])["model.embed_tokens.weight"],
                       _weights(1)["model.embed_tokens.weight"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == names


def test_crash_points_leave_previous_checkpoint(tmp_path, monkeypatch):
    """Pins the atomic-write protocol: a failure while writing rank files (its temp folder removed at
    once), or a crash after the manifest but before the rename, or after the rename but before the
    `latest` pointer moved, leaves step 1 the latest and loadable. The next save deletes the
    `*.tmp-*` leftovers."""
    _save(tmp_path, 1)
    real_save = torch.save

    def crash_save(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck.torch, "save", crash_save)
    with pytest.raises(CheckpointError, match="simulated"):
        _save(tmp_path, 2)
    monkeypatch.setattr(ck.torch, "save", real_save)
    root = tmp_path / "checkpoints"
    assert not list(root.glob("step_000002.tmp-*"))  # a failed write removes its half-written folder
    assert find_latest(tmp_path).name == "step_000001"
    assert load_checkpoint(find_latest(tmp_path))["step"] == 1

    real_replace = os.replace

    def crash_on_dir_rename(src, dst):
        if Path(dst).name == "step_000002":
            raise OSError("killed before rename (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash_on_dir_rename)
    with pytest.raises(OSError, match="before rename"):
        _save(tmp_path, 2)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert find_latest(tmp_path).name == "step_000001"

    real_write = ck._write_text_atomic

    def crash_on_pointer(path, text):
        if path.name == "latest":
            raise OSError("killed before pointer (simulated)")
        return real_write(path, text)

    monkeypatch.setattr(ck, "_write_text_atomic", crash_on_pointer)
    with pytest.raises(OSError, match="before pointer"):
        _save(tmp_path, 2)
    monkeypatch.setattr(ck, "_write_text_atomic", real_write)
    assert find_latest(tmp_path).name == "step_000001"  # the pointer is the commit point

    _save(tmp_path, 3, keep=5)
    assert not list(root.glob("*.tmp-*"))
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000001", "step_000002", "step_000003"]


def test_recency_not_step_number_decides(tmp_path):
    """Pins: a fresh run (checkpoint.resume=false) in a folder holding an older run's step 100 and
    90 keeps its own newest checkpoints and prunes the stale ones; without a pointer the most
    recently written valid checkpoint is used, with a warning."""
    _save(tmp_path, 90, keep=2)
    _save(tmp_path, 100, keep=2)
    _save(tmp_path, 1, keep=2)
    _save(tmp_path, 2, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000001", "step_000002"]
    assert find_latest(tmp_path).name == "step_000002"
    (root / "latest").unlink()
    with pytest.warns(UserWarning, match="pointer did not name a valid checkpoint"):
        assert find_latest(tmp_path).name == "step_000002"


def test_corrupt_latest_falls_back(tmp_path):
    """Pins: a truncated file or a missing manifest in the newest checkpoint makes find_latest fall
    back to the previous one with a warning; a same-size bit flip is caught by checksums (in
    find_latest(checksums=True), and in load_checkpoint's verify of the state files it reads)."""
    _save(tmp_path, 1, keep=5)
    p2 = _save(tmp_path, 2, keep=5)
    model_file = p2 / "model" / "part-rank00000.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    model_file.write_bytes(bytes(data))
    assert find_latest(tmp_path) == p2  # sizes still match
    with pytest.warns(UserWarning, match="sha256.*falling back"):
        assert find_latest(tmp_path, checksums=True).name == "step_000001"
    state_file = p2 / "state.pt"
    state_bytes = bytearray(state_file.read_bytes())
    state_bytes[-1] ^= 0xFF
    state_file.write_bytes(bytes(state_bytes))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(p2)
    model_file.write_bytes(bytes(data[:-10]))
    with pytest.warns(UserWarning, match="bytes, the manifest says"):
        assert find_latest(tmp_path).name == "step_000001"
    (p2 / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="manifest.json is missing"):
        assert find_latest(tmp_path).name == "step_000001"
    assert find_latest(tmp_path / "nowhere") is None


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from safetensors.torch import save_file
    from lingshu_fast.train import checkpoint as ck
    run_dir, asynchronous = sys.argv[1], sys.argv[2] == "async"

    def job(step, fill, slow):
        def write(folder):
            path = folder / "model" / "part-rank00000.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"w": torch.full((256, 1024), fill)}, str(path))
            if slow:
                print("WRITING", flush=True)
                time.sleep(60)  # the parent SIGKILLs us here, between the tensors and the state files
            return [path]
        return ck.SaveJob(step, write, {"step": step}, {"loader": {}})

    writer = ck.CheckpointWriter(run_dir, rank=0, world=1, asynchronous=asynchronous)
    writer.save(job(1, 1.0, False))
    writer.save(job(2, 0.0, True))
    if asynchronous:  # the step loop goes on while the background thread writes
        print("STEPPING", flush=True)
        time.sleep(60)
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_mid_save(tmp_path, mode):
    """Pins: a process killed with SIGKILL in the middle of a save (no Python cleanup runs; with
    checkpoint.async the kill lands while the background thread writes and the main thread has
    gone on) leaves step 1 as the latest valid checkpoint with its original contents, and the next
    save removes the half-written folder."""
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), mode], stdout=subprocess.PIPE,
                            text=True)
    try:
        lines = {proc.stdout.readline().strip() for _ in range(2 if mode == "async" else 1)}
        assert "WRITING" in lines, lines
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    root = tmp_path / "checkpoints"
    assert list(root.glob("step_000002.tmp-*"))
    latest = find_latest(tmp_path)
    assert latest.name == "step_000001"
    got = load_checkpoint(latest)
    assert got["step"] == 1 and bool((_weights_of(latest)["w"] == 1.0).all())
    _save(tmp_path, 2)
    assert not list(root.glob("*.tmp-*")) and find_latest(tmp_path).name == "step_000002"


def test_background_save_publishes_and_reports_errors(tmp_path, monkeypatch):
    """Pins checkpoint.async: `save` returns before the files exist (a thread writes them), `wait`
    publishes the checkpoint exactly as a synchronous save would, and an error in the thread (disk
    full) reaches the caller at the next `wait` instead of vanishing with the thread."""
    import threading

    gate = threading.Event()
    writer = CheckpointWriter(tmp_path, rank=0, world=1, asynchronous=True)
    job = _job(1)
    inner = job.write_tensors
    job.write_tensors = lambda folder: (gate.wait(30), inner(folder))[1]
    writer.save(job)
    assert find_latest(tmp_path) is None  # still writing in the background
    gate.set()
    writer.wait()
    assert find_latest(tmp_path).name == "step_000001"
    assert torch.equal(_weights_of(find_latest(tmp_path))["model.norm.weight"], torch.ones(4))

    def disk_full(folder):
        raise OSError(28, "No space left on device (simulated)")

    failing = _job(2)
    failing.write_tensors = disk_full
    writer.save(failing)
    with pytest.raises(CheckpointError, match="no space left on device"):
        writer.wait()
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))  # the partial save was removed
    assert find_latest(tmp_path).name == "step_000001"


def _two_rank_save_load(dims, run_dir: str):
    import torch.distributed as dist

    r = dims.rank
    for step in (1, 2):
        _save(run_dir, step, keep=1, rank=r, world=dims.world, weights={"w": torch.full((3,), float(10 * step + r))})
    dist.barrier()
    # Rank 0 fails while publishing step 3: every rank must get the error instead of hanging.
    real_publish = ck._publish

    def failing_publish(*a, **k):
        raise OSError("no space left (simulated)")

    ck._publish = failing_publish
    try:
        _save(run_dir, 3, rank=r, world=dims.world)
        publish_error = None
    except CheckpointError as err:
        publish_error = str(err)
    finally:
        ck._publish = real_publish
    latest = find_latest(run_dir)
    got = load_checkpoint(latest, rank=r)
    return dict(latest=latest.name, publish_error=publish_error, w=_weights_of(latest, 1 - r)["w"].tolist(),
                cursor=got["rank_state"]["loader"]["cursor"], files=sorted(got["manifest"]["files"]),
                dirs=sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir()))


@pytest.mark.dist
def test_two_ranks_gloo(tmp_path):
    """Pins: with 2 ranks the manifest lists both ranks' files, each rank reads back its own
    loader cursor and the other rank's tensors are there, keep=1 prunes step 1 for both, and a
    failure on rank 0 while publishing reaches every rank as a CheckpointError (not a hang at a
    barrier) with step 2 still the latest."""
    res = spawn(_two_rank_save_load, 2, str(tmp_path))
    for r, out in enumerate(res):
        assert out["latest"] == "step_000002" and out["w"] == [float(20 + 1 - r)] * 3
        assert out["cursor"] == 20 + r
        assert out["files"] == ["model/part-rank00000.safetensors", "model/part-rank00001.safetensors",
                                "rank_state/rank00000.pt", "rank_state/rank00001.pt", "state.pt"]
        assert [d for d in out["dirs"] if ".tmp-" not in d] == ["latest", "step_000002"]
        assert "failed on rank 0: OSError: no space left" in out["publish_error"]
