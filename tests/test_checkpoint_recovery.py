"""Recovery from bad checkpoints and full disks (train.resume, train.save_guard, train.checkpoint).

- every checkpoint invalid: stop with one line naming each and why (not a silent step-0 restart);
- a same-size corruption of the newest checkpoint: fall back to the previous one (not block restarts);
- a full disk: `no space left on device: PATH (needs ~X)`, checked before writing, the temp folder
  removed when a write fails anyway, and a restart on the still-full disk stops the same clean way.
Real ENOSPC comes from a small tmpfs (skipped where mounting is not allowed); the same paths are
also driven by monkeypatched writers so they run everywhere.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lingshu_fast.cli import main as cli_main
from lingshu_fast.train import checkpoint as ck
from lingshu_fast.train.checkpoint import CheckpointError, CheckpointWriter, SaveJob, find_latest
from lingshu_fast.train.metrics import truncate_metrics


def _save(run_dir, step, nbytes=4096, keep=2):
    def write(folder: Path) -> list:
        from safetensors.torch import save_file

        path = folder / "model" / "part-rank00000.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.ones(nbytes // 4)}, str(path))
        return [path]

    job = SaveJob(step=step, write_tensors=write, global_state={"step": step, "extra": {"step": step}},
                  rank_state={"m": torch.zeros(8)}, tensor_bytes=nbytes)
    CheckpointWriter(run_dir, rank=0, world=1, keep=keep).save(job)
    return Path(run_dir) / "checkpoints" / ck.step_dir_name(step)


def _flip(path: Path, count: int = 64) -> None:
    """A same-size corruption: `count` bytes in the middle of the file inverted."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + count] = bytes(b ^ 0xFF for b in data[mid:mid + count])
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ a small real disk

@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a tmpfs of that size (e.g. "2m"); skipped where mounting is not allowed."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _fill(folder: Path, leave_bytes: int = 0) -> None:
    """Fill the filesystem of `folder` until `leave_bytes` (or nothing) is free."""
    free = shutil.disk_usage(folder).free - leave_bytes
    with open(folder / "filler.bin", "wb") as f:
        try:
            while free > 0:
                chunk = min(free, 1 << 20)
                f.write(b"\0" * chunk)
                f.flush()
                free -= chunk
        except OSError as err:
            assert err.errno == errno.ENOSPC


# ------------------------------------------------------------------ disk full

def test_save_checks_free_space_before_writing(tmp_path, monkeypatch):
    """Pins: a save that cannot fit stops before writing a byte, with `no space left on device:
    <path> (needs ~X)` (it used to fill the disk and die with torch's `inline_container.cc` error);
    the previous checkpoint stays the latest. Tolerance: the estimate is the tensors' bytes x 1.05
    + 1 MB, so 1 MB free can never pass for a 4 MB state."""
    first = _save(tmp_path, 1)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    with pytest.raises(ck.DiskFullError, match=r"no space left on device: .*checkpoints \(needs ~5\.\d+ MB, 1.05 MB free\)"):
        _save(tmp_path, 2, nbytes=4 << 20)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"] and find_latest(tmp_path) == first


def test_failed_write_removes_its_temp_folder(tmp_path, monkeypatch):
    """Pins: ENOSPC in the middle of a save (the tensors written, the state file not) removes the
    half-written `.tmp-*` folder at once (it used to stay and keep the disk full) and says so."""
    _save(tmp_path, 1)
    real_save = torch.save

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(ck.DiskFullError, match="no space left on device: .*the partial save was removed"):
        _save(tmp_path, 2)
    monkeypatch.setattr(ck.torch, "save", real_save)
    root = tmp_path / "checkpoints"
    assert not list(root.glob("*.tmp-*")) and find_latest(tmp_path).name == "step_000001"


def test_real_full_disk(small_disk, monkeypatch):
    """Pins the same on a real 3 MB tmpfs: the free-space check refuses a 4 MB save outright; with
    the check fooled (another process filling the disk meanwhile) the real ENOSPC is reported as
    disk full and the temp folder removed; then, with the disk full to the last byte, cutting
    metrics.jsonl back for a resume works in place (it used to need room for a full copy)."""
    disk = small_disk("3m")
    _save(disk, 1, nbytes=64 << 10)
    with pytest.raises(ck.DiskFullError, match="needs ~"):
        _save(disk, 2, nbytes=4 << 20)
    usage = shutil.disk_usage(disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1 << 40))
    with pytest.raises(ck.DiskFullError, match="the partial save was removed"):
        _save(disk, 2, nbytes=4 << 20)
    monkeypatch.undo()
    assert not list((disk / "checkpoints").glob("*.tmp-*")) and find_latest(disk).name == "step_000001"
    metrics = disk / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"stage": 3, "step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    _fill(disk)
    assert truncate_metrics(metrics, after_step=2, stage=3) == 3
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from lingshu_fast.data.demo_data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("recovery_data"), num_train_images=8, num_eval_images=2)


@pytest.mark.usefixtures("world_of_one")
def test_training_on_a_full_disk_stops_cleanly_twice(small_disk, capsys, demo_data):
    """Pins end to end: a run whose first checkpoint cannot fit on its 6 MB disk stops with one
    line and exit 2, leaving no temp folder; restarting on the still-full disk stops the same way
    (it used to crash in truncate_metrics). The tiny checkpoint is ~4.3 MB of tensors (~5.5 MB asked), 1.4 MB of the disk holds the tiny init."""
    run_dir = small_disk("6m") / "run"
    argv = ["train", "tiny-sft", f"run.dir={run_dir}", f"data.train=[{demo_data['instruct']}]", "run.progress=false",
            "train.max_steps=2", "checkpoint.every=1", "train.global_microbatches=1"]
    for _ in range(2):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        message = err[err.index("lingshu-fast: "):]
        assert message.count("\n") == 1 and "Traceback" not in err
        assert message.startswith(f"lingshu-fast: no space left on device: {run_dir / 'checkpoints'} (needs ~")
        assert not list((run_dir / "checkpoints").glob("*.tmp-*"))


# ------------------------------------------------------------------ resume

def _train(run_dir, data, *overrides):
    from lingshu_fast.config import load_config
    from lingshu_fast.parallel.state import current_dims
    from lingshu_fast.train.loop import train

    cfg = load_config("tiny-sft", [f"run.dir={run_dir}", f"data.train=[{data}]", "run.progress=false", *overrides])
    return train(cfg, current_dims())


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("world_of_one")
def test_same_size_corruption_of_newest_falls_back(tmp_path, demo_data):
    """Pins: 64 flipped bytes in the newest checkpoint's model file (sizes intact, so the old
    size-only choice picked it and the sha256 check at load then failed every restart) make the
    restart resume from the previous checkpoint, with a warning, and continue exactly: the redone
    steps equal the first run's (same process and layout: bit-identical but for 1e-6 relative)."""
    run, steps = tmp_path / "run", ("train.max_steps=4", "checkpoint.every=2", "train.global_microbatches=1")
    _train(run, demo_data["instruct"], *steps)
    first = _rows(run)
    _flip(run / "checkpoints" / "step_000004" / "model" / "part-rank00000.safetensors")
    with pytest.warns(UserWarning, match="step_000004.*sha256"):
        summary = _train(run, demo_data["instruct"], *steps)
    assert summary["steps"] == 4
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in first], rel=1e-6)


@pytest.mark.usefixtures("world_of_one")
def test_every_checkpoint_invalid_stops_unless_fresh_start_allowed(tmp_path, capsys, demo_data):
    """Pins: when every checkpoint in run.dir is invalid (one truncated, one corrupted at equal
    size) the run used to restart from step 0 with warnings only, overwriting the run's history;
    now it stops with one line naming each checkpoint and why, and checkpoint.allow_fresh_start=true
    starts from step 0 on purpose."""
    run = tmp_path / "run"
    _train(run, demo_data["instruct"], "train.max_steps=2", "checkpoint.every=1", "train.global_microbatches=1")
    step1, step2 = (run / "checkpoints" / f"step_00000{s}" / "model" / "part-rank00000.safetensors" for s in (1, 2))
    step1.write_bytes(step1.read_bytes()[:-100])
    _flip(step2)
    argv = ["train", "tiny-sft", f"run.dir={run}", f"data.train=[{demo_data['instruct']}]", "run.progress=false",
            "train.max_steps=2", "checkpoint.every=1", "train.global_microbatches=1"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    message = err[err.index("lingshu-fast: "):]
    assert message.count("\n") == 1 and "Traceback" not in err
    assert "step_000002 (" in message and "sha256" in message and "step_000001 (" in message
    assert "bytes, the manifest says" in message and "checkpoint.allow_fresh_start=true" in message
    assert [r["step"] for r in _rows(run)] == [1, 2]  # nothing was touched
    with pytest.warns(UserWarning, match="starting from step 0"):
        summary = _train(run, demo_data["instruct"], "train.max_steps=2", "checkpoint.every=1",
                         "train.global_microbatches=1", "checkpoint.allow_fresh_start=true")
    assert summary["steps"] == 2 and [r["step"] for r in _rows(run)] == [1, 2]


def test_load_latest_agrees_and_reports(tmp_path):
    """Pins the selection itself: a valid newest checkpoint is taken without touching older ones; a
    run folder without step folders is a fresh start (None), not an error."""
    from lingshu_fast.train.resume import load_latest

    assert load_latest(tmp_path / "empty") is None
    _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    path, saved = load_latest(tmp_path)
    assert path == second and saved["state"]["extra"] == {"step": 2}
    _flip(second / "state.pt")
    with pytest.warns(UserWarning, match="newer checkpoint"):
        path, saved = load_latest(tmp_path)
    assert path.name == "step_000001" and saved["state"]["extra"] == {"step": 1}
    _flip(path / "model" / "part-rank00000.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be loaded: step_000002 .*; step_000001"):
        load_latest(tmp_path)
