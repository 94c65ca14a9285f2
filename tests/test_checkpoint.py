"""Atomic per-rank checkpoints (lingshu_fast.train.checkpoint): round trip, crashes, keep-N, ranks."""
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
    CheckpointError, capture_rng_state, find_latest, load_checkpoint, restore_rng_state, save_checkpoint,
)


def _model_state(seed: int) -> dict:
    torch.manual_seed(seed)
    emb = torch.randn(11, 4)
    # The LM head tied to the embedding: one storage under two names (safetensors rejects aliases).
    return {"embed.weight": emb, "lm_head.weight": emb, "norm.weight": torch.ones(4),
            "proj.weight": torch.randn(4, 6).t(), "step_count": torch.tensor(3),
            "proj._extra_state": None}  # Megatron-Core layers put None here


def _optim_state() -> tuple[dict, dict]:
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    sched_state = sched.state_dict()
    sched_state["lr_lambdas"] = [None]  # a plain lambda is not saved by LambdaLR anyway
    return opt.state_dict(), sched_state


def _save(run_dir, step, seed=0, **kw):
    optim_state, sched_state = _optim_state()
    return save_checkpoint(run_dir, step, model_state=_model_state(seed), optim_state=optim_state,
                           sched_state=sched_state, loader_state={"epoch": 1, "cursor": step * 10,
                                                                  "order": torch.arange(5)},
                           extra={"stage": 3, "config": {"lr": 1e-5}}, **kw)


def test_round_trip_and_rng_restore(tmp_path):
    """Pins: every piece comes back equal (tied weights included, saved as separate copies), the
    state file loads under weights_only=True, and restoring the RNG state replays python, numpy
    and torch draws exactly."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    rng = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    path = save_checkpoint(tmp_path, 7, model_state=_model_state(0), optim_state=_optim_state()[0],
                           sched_state={"last_epoch": 7}, rng_state=rng, loader_state={"cursor": 70},
                           extra={"stage": 1})
    assert path == tmp_path / "checkpoints" / "step_000007" and find_latest(tmp_path) == path
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000007"
    got = load_checkpoint(path, rank=0, world=1)
    ref = _model_state(0)
    assert set(got["model_state"]) == set(ref)
    for k, v in ref.items():
        assert (got["model_state"][k] is None) if v is None else torch.equal(got["model_state"][k], v), k
    assert got["step"] == 7 and got["extra"] == {"stage": 1} and got["loader_state"] == {"cursor": 70}
    assert torch.equal(got["optim_state"]["state"][0]["exp_avg"], _optim_state()[0]["state"][0]["exp_avg"])
    torch.load(path / "state_rank00000.pt", weights_only=True)  # raises if anything is not plain data
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(got["rng_state"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])
    with pytest.raises(CheckpointError, match="saved by 1 ranks, this run has 2"):
        load_checkpoint(path, rank=0, world=2)


def test_keep_n_and_resave_same_step(tmp_path):
    """Pins: only the `keep` newest checkpoints stay (disk fills otherwise), and saving a step that
    already exists (a resume at that step) replaces it instead of failing on the rename."""
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000004", "step_000005"]
    _save(tmp_path, 5, seed=1, keep=2)
    got = load_checkpoint(find_latest(tmp_path))
    assert torch.equal(got["model_state"]["embed.weight"], _model_state(1)["embed.weight"])
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
    find_latest(checksums=True) and in load_checkpoint's verify)."""
    _save(tmp_path, 1, keep=5)
    p2 = _save(tmp_path, 2, keep=5)
    model_file = p2 / "model_rank00000.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    model_file.write_bytes(bytes(data))
    assert find_latest(tmp_path) == p2  # sizes still match
    with pytest.warns(UserWarning, match="sha256.*falling back"):
        assert find_latest(tmp_path, checksums=True).name == "step_000001"
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
    from lingshu_fast.train import checkpoint as ck
    run_dir = sys.argv[1]
    big = {"w": torch.randn(256, 1024)}
    ck.save_checkpoint(run_dir, 1, model_state=big, optim_state={"x": torch.ones(3)})
    real_fsync = ck._fsync_file
    def slow_fsync(path):
        real_fsync(path)
        print("WRITING", flush=True)
        time.sleep(60)  # the parent SIGKILLs us here, between the model file and the state file
    ck._fsync_file = slow_fsync
    ck.save_checkpoint(run_dir, 2, model_state={"w": torch.zeros(256, 1024)},
                       optim_state={"x": torch.zeros(3)})
""")


@pytest.mark.slow
def test_sigkill_mid_save(tmp_path):
    """Pins: a process killed with SIGKILL in the middle of a save (no Python cleanup runs) leaves
    step 1 as the latest valid checkpoint with its original contents, and the next save removes the
    half-written folder."""
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", line
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
    assert got["model_state"]["w"].abs().sum() > 0 and torch.equal(got["optim_state"]["x"], torch.ones(3))
    _save(tmp_path, 2)
    assert not list(root.glob("*.tmp-*")) and find_latest(tmp_path).name == "step_000002"


def _two_rank_save_load(dims, run_dir: str):
    import torch.distributed as dist

    r = dims.rank
    for step in (1, 2):
        # Rank 1 plays a DP replica: it saves no model (rank 0's file holds the weights).
        weights = {"w": torch.full((3,), float(10 * step))} if r == 0 else None
        save_checkpoint(run_dir, step, model_state=weights,
                        optim_state={"shard": torch.full((2,), float(r + step))},
                        loader_state={"cursor": 100 * step + r}, rank=r, world=dims.world, keep=1)
    dist.barrier()
    # Rank 0 fails while publishing step 3: every rank must get the error instead of hanging.
    real_publish = ck._publish

    def failing_publish(*a, **k):
        raise OSError("no space left (simulated)")

    ck._publish = failing_publish
    try:
        save_checkpoint(run_dir, 3, optim_state={}, rank=r, world=dims.world)
        publish_error = None
    except CheckpointError as err:
        publish_error = str(err)
    finally:
        ck._publish = real_publish
    latest = find_latest(run_dir)
    got = load_checkpoint(latest, rank=r, world=dims.world, model_rank=0)
    return dict(latest=latest.name, publish_error=publish_error, w=got["model_state"]["w"].tolist(),
                shard=got["optim_state"]["shard"].tolist(),
                cursor=got["loader_state"]["cursor"], files=sorted(got["manifest"]["files"]),
                dirs=sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir()))


@pytest.mark.dist
def test_two_ranks_gloo(tmp_path):
    """Pins: with 2 ranks the manifest lists both ranks' files, each rank reads back its own
    optimizer shard and loader cursor, a rank without model weights reads rank 0's, keep=1
    prunes step 1 for both, and a failure on rank 0 while publishing reaches every rank as a
    CheckpointError (not a hang at a barrier) with step 2 still the latest."""
    res = spawn(_two_rank_save_load, 2, str(tmp_path))
    for r, out in enumerate(res):
        assert out["latest"] == "step_000002" and out["w"] == [20.0] * 3
        assert out["shard"] == [float(r + 2)] * 2 and out["cursor"] == 200 + r
        assert out["files"] == ["model_rank00000.safetensors", "state_rank00000.pt", "state_rank00001.pt"]
        assert [d for d in out["dirs"] if ".tmp-" not in d] == ["latest", "step_000002"]
        assert "failed on rank 0: OSError: no space left" in out["publish_error"]
