"""A sample whose image fails only when decoded empties its micro-batch; every stage must go on.

The header scan at start-up sees a valid size, so the sample is planned into a micro-batch; the
decode in the loader then fails and drops it. With the LLM frozen (stage 1) nothing trainable is
left on that micro-batch's path: the step must skip its backward (not raise "element 0 of tensors
does not require grad"), count the sample, keep every collective in step, and train on the rest,
with and without pipeline parallelism.
"""
import json
import multiprocessing
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from lingshu_fast.parallel.spawn import spawn


def _captions(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for k in range(4):
        path = folder / f"scan{k}.jpg"
        PIL.Image.fromarray(rng.integers(0, 255, (84, 112, 3), dtype=np.uint8)).save(path, quality=90)
        lines.append({"image": str(path), "caption": f"an axial scan number {k} with a small lesion"})
    broken = folder / "scan3.jpg"
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 3])  # header intact, pixels cut
    data = folder / "captions.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return data


def _stage1(dims, run_dir, data):
    from lingshu_fast.config import load_config
    from lingshu_fast.train.loop import train

    cfg = load_config("tiny-stage1", [f"run.dir={run_dir}", f"data.train=[{data}]", "train.max_steps=3",
                                      "run.progress=false", "checkpoint.every=0", f"parallel.pp={dims.pp}",
                                      "train.global_microbatches=2", "data.shuffle_window=1"])
    train(cfg, dims)
    if dims.rank != 0:
        return None
    # the loader's builder processes (one here with pp=1 on 2 cores) end with the stage, not at exit
    assert not multiprocessing.active_children(), multiprocessing.active_children()
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("pp", [1, 2])
def test_stage1_survives_a_micro_batch_emptied_by_a_corrupt_image(tmp_path, pp):
    data = _captions(tmp_path)
    rows = spawn(_stage1, pp, str(tmp_path / "run"), str(data), pp=pp)[0]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["skipped_samples"] >= 1  # the corrupt image was counted
