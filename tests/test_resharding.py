"""Checkpoints that reshard: saved under one (TP, PP, DP) layout, resumed under another.

A run saved after step 3 under (tp2, dp2), (pp2, dp2) and (dp4) (the distributed optimizer on, so
masters and Adam moments are spread over DP ranks) resumes under (tp1, dp1) and under (tp2, pp2);
steps 4-8 must equal the uninterrupted run at the new layout. Tolerance 1e-4 relative, the layout
bar of test_engine.py: the layouts differ only in the order of fp32 reductions, and a resume that
lost or misplaced any tensor (a moment of the wrong shard, a TP slice of the wrong rows, a stale
data position) moves the loss by far more. The schedule is constant so that the 3-step save runs
and the 8-step runs share their learning rates.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist

from lingshu_fast.parallel.spawn import spawn

SAVED = {"tp2dp2": (2, 1), "pp2dp2": (1, 2), "dp4": (1, 1)}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from lingshu_fast.data.demo_data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("data"))


def _cfg(run_dir, data, steps, tp, pp):
    from lingshu_fast.config import load_config

    return load_config("tiny-sft", [f"run.dir={run_dir}", f"data.train=[{data}]", f"train.max_steps={steps}",
                                    "run.progress=false", "checkpoint.every=0", "optim.schedule=constant",
                                    "optim.warmup_steps=0", "optim.distributed=true", f"parallel.tp={tp}",
                                    f"parallel.pp={pp}"])


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _world_of_four(dims, root, data):
    """Spawned (4 ranks): the three saves, then the (tp2, pp2) reference run and the three resumes."""
    from lingshu_fast.parallel.state import init_parallel
    from lingshu_fast.train.loop import train

    root = Path(root)
    for name, (tp, pp) in SAVED.items():
        train(_cfg(root / name, data, 3, tp, pp), init_parallel(tp, pp, backend="gloo"))
    dims = init_parallel(2, 2, backend="gloo")
    train(_cfg(root / "ref_tp2pp2", data, 8, 2, 2), dims)
    for name in SAVED:
        target = root / f"{name}_to_tp2pp2"
        if dims.rank == 0:
            shutil.copytree(root / name, target)
        dist.barrier()
        train(_cfg(target, data, 8, 2, 2), dims)
    return dims.rank


def test_checkpoints_resume_under_other_layouts(tmp_path, demo_data, world_of_one):
    from lingshu_fast.parallel.state import current_dims
    from lingshu_fast.train.loop import train

    data = str(demo_data["instruct"])
    assert spawn(_world_of_four, 4, str(tmp_path), data, tp=2, pp=2) == [0, 1, 2, 3]
    train(_cfg(tmp_path / "ref_tp1", data, 8, 1, 1), current_dims())
    for name in SAVED:
        shutil.copytree(tmp_path / name, tmp_path / f"{name}_to_tp1")
        train(_cfg(tmp_path / f"{name}_to_tp1", data, 8, 1, 1), current_dims())
    for new in ("tp1", "tp2pp2"):
        want = _rows(tmp_path / f"ref_{new}")
        assert [r["step"] for r in want] == list(range(1, 9))
        for name in SAVED:
            got = _rows(tmp_path / f"{name}_to_{new}")
            assert [r["step"] for r in got] == list(range(1, 9)), (name, new)
            for key in ("loss", "grad_norm"):
                for a, b in zip(want[3:], got[3:]):
                    assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]), (name, new, key, a[key], b[key])
