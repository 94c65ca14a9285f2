"""A run that learns nothing must say so: a collapsed run (grad_norm exactly 0 with trainable
parameters, or a cross-entropy loss sitting at ln(V)) warns once and counts its steps; a global
batch with no label tokens is a one-line data error, not a "successful" step at loss 0."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lingshu_fast.cli import main as cli_main
from lingshu_fast.train.metrics import CollapseWatch

pytestmark = pytest.mark.usefixtures("world_of_one")

LN_V = math.log(1024)


def test_collapse_watch_rules(capsys):
    watch = CollapseWatch(1024, patience=3)
    healthy = dict(grad_norm=2.5, count=100, trainable=True)
    assert not watch.observe(1, loss=LN_V, **healthy)  # near ln(V) once: a fresh model starts there
    assert not watch.observe(2, loss=LN_V * (1 + 5e-4), **healthy)
    assert not watch.observe(3, loss=LN_V * 0.99, **healthy)  # it moved: the count starts again
    assert watch.flat == 0 and watch.total == 0
    for step in (4, 5):
        assert not watch.observe(step, loss=LN_V, **healthy)
    assert watch.observe(6, loss=LN_V, **healthy)  # the third flat step in a row
    assert watch.observe(7, loss=LN_V, **healthy)
    assert watch.total == 2
    err = capsys.readouterr().err
    assert err.count("looks collapsed") == 1 and "ln(V) = 6.9315" in err and "step 6" in err

    dead = CollapseWatch(None)  # no vocabulary (GRPO): only the zero-gradient rule
    assert not dead.observe(1, loss=0.0, grad_norm=0.0, count=10, trainable=True)  # zero advantages: legit
    assert not dead.observe(2, loss=3.0, grad_norm=0.0, count=10, trainable=False)  # nothing trainable
    assert not dead.observe(3, loss=3.0, grad_norm=0.0, count=0, trainable=True)  # nothing to learn from
    assert not dead.observe(4, loss=float("nan"), grad_norm=0.0, count=10, trainable=True)  # skipped as NaN
    assert dead.observe(5, loss=3.0, grad_norm=0.0, count=10, trainable=True)
    assert "grad_norm is exactly 0" in capsys.readouterr().err

    again = CollapseWatch(1024, patience=3)
    again.load_state_dict(watch.state_dict())  # kept across a resume
    assert (again.flat, again.total) == (watch.flat, watch.total)


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    from lingshu_fast.data.demo_data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("health"), num_train_images=8, num_eval_images=2)["instruct"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_collapsed_run_warns_once_and_counts(tmp_path, instruct, capsys):
    """optim.lr=3e4 drives the tiny model to constant logits: loss ln(V) with grad_norm exactly 0."""
    run_dir = tmp_path / "run"
    status = cli_main(["train", "tiny-sft", f"run.dir={run_dir}", f"data.train=[{instruct}]", "run.progress=false",
                       "optim.lr=3e4", "train.max_steps=5", "checkpoint.every=0"])
    err = capsys.readouterr().err
    assert status == 0, err
    rows = _rows(run_dir)
    assert rows[-1]["loss"] == pytest.approx(LN_V, rel=1e-4) and rows[-1]["grad_norm"] == 0.0
    assert err.count("looks collapsed") == 1, err
    assert [r["collapsed_steps"] for r in rows] == [0, 1, 2, 3, 4]


def test_healthy_run_reports_no_collapse(tmp_path, instruct, capsys):
    run_dir = tmp_path / "run"
    assert cli_main(["train", "tiny-sft", f"run.dir={run_dir}", f"data.train=[{instruct}]", "run.progress=false",
                     "train.max_steps=3", "checkpoint.every=0"]) == 0
    assert "collapsed" not in capsys.readouterr().err
    assert all(r["collapsed_steps"] == 0 for r in _rows(run_dir))


def test_global_batch_without_label_tokens_is_one_line(tmp_path, instruct, capsys, monkeypatch):
    """Every label masked (as when truncation leaves no assistant text): one line, exit 2, no update."""
    from lingshu_fast.data.loader import PackedLoader

    take_step = PackedLoader.take_step

    def unlabelled(self, count):
        mbs = take_step(self, count)
        for mb in mbs:
            mb.labels = torch.full_like(mb.labels, -100)
            mb.num_label_tokens = 0
        return mbs

    monkeypatch.setattr(PackedLoader, "take_step", unlabelled)
    status = cli_main(["train", "tiny-sft", f"run.dir={tmp_path / 'run'}", f"data.train=[{instruct}]",
                       "run.progress=false", "train.max_steps=2"])
    err = capsys.readouterr().err
    assert status == 2, err
    message = err[err.index("lingshu-fast: "):]
    assert message.count("\n") == 1 and "data error: step 1: the global batch" in message
    assert "no label tokens" in message and "Traceback" not in err
