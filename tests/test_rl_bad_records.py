"""Stage 4 survives a bad image found only at rollout time: a truncated DICOM whose header reads fine
(so the start-up scan keeps it) used to end `tiny-rl` with a DataError traceback from rl/rollout.py.
Now the prompt is skipped, counted once, and the next readable prompt takes its place, on one process
and with two data-parallel ranks (whose collectives must stay in step)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lingshu_fast.parallel.spawn import spawn
from lingshu_fast.rl.rewards import register_reward, registered_rewards


def _space_start(response: str, sample: dict) -> float:
    return float(response.startswith(" "))


if "space_start" not in registered_rewards():
    register_reward("space_start", inline=True)(_space_start)


@pytest.fixture(scope="module")
def bad_rl_data(tmp_path_factory) -> Path:
    """4 RL prompts beside the demo images: 3 good, and 1 on a copy of a demo DICOM cut to 60% (its
    header intact, its pixel data short)."""
    from lingshu_fast.data.demo_data import build_demo_dataset

    data = build_demo_dataset(tmp_path_factory.mktemp("rl_bad"), num_train_images=8, num_eval_images=2)
    folder = Path(data["rl"]).parent
    records = [json.loads(x) for x in Path(data["rl"]).read_text().splitlines()]
    dicom = next(r for r in records if r["images"][0].endswith(".dcm"))
    good = [r for r in records if not r["images"][0].endswith(".dcm")][:3]
    source = folder / dicom["images"][0]
    blob = source.read_bytes()
    (folder / "images" / "truncated.dcm").write_bytes(blob[:int(len(blob) * 0.6)])
    bad = dict(dicom, images=["images/truncated.dcm"])
    out = folder / "rl_one_truncated.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in good[:2] + [bad] + good[2:]))
    return out


def _overrides(run_dir, data, *extra):
    return [f"run.dir={run_dir}", f"data.train=[{data}]", "run.progress=false", "rl.rewards=[space_start:1.0]",
            "rl.rollout_batch=4", "rl.num_generations=2", "rl.max_new_tokens=2", "rl.updates_per_rollout=1",
            "rl.beta=0", "train.max_steps=2", "checkpoint.every=0", *extra]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("world_of_one")
def test_truncated_dicom_is_skipped_and_counted(tmp_path, bad_rl_data):
    """Pins: the run finishes both steps (each rollout holds all 4 prompts, so the bad one comes up
    in every rollout), skipped_samples is 1 (the prompt is counted once, not per rollout), every
    rollout still has 4 x 2 responses, and the skip survives a resume (kept in the prompt state)."""
    from lingshu_fast.config import load_config
    from lingshu_fast.parallel.state import current_dims
    from lingshu_fast.rl.loop import train_rl

    run_dir = tmp_path / "run"
    summary = train_rl(load_config("tiny-rl", _overrides(run_dir, bad_rl_data)), current_dims())
    rows = _rows(run_dir)
    assert summary["steps"] == 2 and [r["step"] for r in rows] == [1, 2]
    assert [r["skipped_samples"] for r in rows] == [1, 1]
    assert all(r["finished_rate"] is not None and r["tokens"] > 0 for r in rows)
    summary = train_rl(load_config("tiny-rl", _overrides(run_dir, bad_rl_data, "train.max_steps=3",
                                                         "checkpoint.every=1")), current_dims())
    assert summary["steps"] == 3 and _rows(run_dir)[-1]["skipped_samples"] == 1


@pytest.mark.usefixtures("world_of_one")
def test_strict_mode_reports_the_truncated_dicom_at_start(tmp_path, bad_rl_data):
    """Pins: under data.strict=true the truncated file is found by a full decode at start-up and
    reported with its file:line, before any model is built or rollout made."""
    from lingshu_fast.config import load_config
    from lingshu_fast.data.formats import DataError
    from lingshu_fast.data.tokenizer import load_tokenizer
    from lingshu_fast.rl.rollout import PromptDataset

    cfg = load_config("tiny-rl", _overrides(tmp_path / "run", bad_rl_data, "data.strict=true"))
    with pytest.raises(DataError, match=rf"{bad_rl_data}:3: corrupt_image"):
        PromptDataset(cfg.data.train, load_tokenizer("tiny"), cfg.data, max_new_tokens=2)


def _dp_run(dims, run_dir: str, data: str):
    """Spawned: the RL loop on 2 data-parallel ranks; rank 0 returns its metrics rows."""
    from lingshu_fast.config import load_config
    from lingshu_fast.rl.loop import train_rl

    train_rl(load_config("tiny-rl", _overrides(Path(run_dir), data)), dims)
    return _rows(Path(run_dir)) if dims.rank == 0 else None


@pytest.mark.dist
def test_two_data_parallel_ranks_stay_in_step(tmp_path, bad_rl_data):
    """Pins: with dp=2 each rank takes 2 of the 4 prompts, so only one rank meets the bad file; that
    rank replaces it and both keep 2 prompts, the all-reduced counts agree (no hang, no mismatch),
    and the metrics count the skipped prompt once over the ranks (step 2's rollout gives it to the
    other rank: the ranks share what they met)."""
    rows = spawn(_dp_run, 2, str(tmp_path / "dp2"), str(bad_rl_data), timeout_s=600)[0]
    assert [r["step"] for r in rows] == [1, 2] and [r["skipped_samples"] for r in rows] == [1, 1]
    assert all(r["response_len"] > 0 for r in rows)
    shutil.rmtree(tmp_path / "dp2", ignore_errors=True)
