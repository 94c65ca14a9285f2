"""Mistakes a user can fix end as one line (a data.strict report as one block) and exit status 2,
never a traceback: through `lingshu_fast.cli.main`, as the `lingshu-fast` command runs it."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from lingshu_fast.cli import main as cli_main
from lingshu_fast.parallel.spawn import spawn

pytestmark = pytest.mark.usefixtures("world_of_one")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from lingshu_fast.data.demo_data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("cli_errors"), num_train_images=8, num_eval_images=2)


def _run(capsys, argv) -> str:
    """The CLI's stderr from its message on (a progress bar of transformers' may precede it)."""
    status = cli_main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and "lingshu-fast: " in err, err
    return err[err.index("lingshu-fast: "):]


def _train(tmp_path, data, *overrides) -> list[str]:
    return ["train", "tiny-sft", f"run.dir={tmp_path / 'run'}", f"data.train=[{data}]", "run.progress=false",
            "train.max_steps=2", "train.global_microbatches=1", *overrides]


@pytest.mark.parametrize("override, needle", [
    ("data.train=[a.jsonl", "cannot read the value '[a.jsonl'"),
    ("data.train=[a,,]", "cannot read the value '[a,,]'"),
    ("rl.rewards=['format:0.5", "close every bracket and quote"),
    ("optim.lr=-1e-4", "optim.lr must be >= 0"),
    ("optim.lr=nan", "optim.lr must be >= 0, got nan"),
    ("optim.betas=[0.9,1.0]", "optim.betas must be >= 0 and < 1"),
    ("data.max_length=0", "data.max_length must be >= 1, got 0"),
])
def test_config_mistakes_are_one_line(capsys, override, needle):
    """Pins: override syntax errors (an unclosed list or quote, an empty list item) used to escape
    as a yaml traceback; a negative/NaN LR, betas of 1 and max_length 0 used to run or crash later."""
    err = _run(capsys, ["train", "tiny-sft", override])
    assert err.count("\n") == 1 and needle in err and "config error" in err


def test_data_problems_are_one_line(tmp_path, capsys, demo_data):
    """Pins: a missing data file and an empty one used to end in a DataError traceback; now one line
    naming the file."""
    missing = tmp_path / "nope.jsonl"
    err = _run(capsys, _train(tmp_path, missing))
    assert err.count("\n") == 1 and f"data file not found: {missing}" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _run(capsys, _train(tmp_path, empty))
    assert err.count("\n") == 1 and str(empty) in err and "no usable sample" in err


def test_strict_report_is_one_block(tmp_path, capsys, demo_data):
    """Pins: the data.strict=true report (its content was always good) is printed as the message
    itself - every bad record with file:line, then what to do - not below a traceback."""
    lines = Path(demo_data["instruct"]).read_text().splitlines()[:6]
    data = Path(demo_data["instruct"]).parent / "bad_strict.jsonl"  # beside the images it names
    data.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    err = _run(capsys, _train(tmp_path, data, "data.strict=true"))
    assert err.startswith("lingshu-fast: data error: data.strict=true and 1 bad record(s)")
    assert f"{data}:4: bad_json" in err and "set data.strict=false" in err


def test_diverged_run_is_one_line(tmp_path, capsys, demo_data):
    """Pins: TrainingDiverged (lr 1e30 makes step 2's loss NaN; one skip allowed in a row) is its
    own one-line advice, not a traceback."""
    err = _run(capsys, _train(tmp_path, demo_data["instruct"], "optim.lr=1e30", "optim.warmup_steps=0",
                              "train.max_consecutive_skips=1", "train.max_steps=3"))
    assert err.count("\n") == 1 and err.startswith("lingshu-fast: training diverged: 1 consecutive steps skipped")


def _tp_does_not_divide(dims, folder: str, run_dir: str, data: str):
    """Spawned: the CLI's train under torchrun's environment; returns (status, stderr)."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        status = cli_main(["train", "tiny-sft", f"model.path={folder}", f"run.dir={run_dir}", f"data.train=[{data}]",
                           "run.progress=false", "parallel.tp=2", "train.max_steps=1"])
    return status, buf.getvalue()


def test_tp_not_dividing_heads_under_torchrun(tmp_path, demo_data):
    """Pins: with 2 ranks and parallel.tp=2 on a model with 1 KV head, every rank used to print a
    ValueError traceback; now rank 0 prints one line naming the key and the heads, the other rank
    prints nothing (it is the same error), and both exit 2."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lingshu_fast.data.tokenizer import load_tokenizer
    from lingshu_fast.train.tiny import _tiny_config

    tokenizer = load_tokenizer("tiny")
    config = _tiny_config(tokenizer)
    config.text_config.num_key_value_heads = 1
    folder = tmp_path / "one_kv_head"
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (rank0, err0), (rank1, err1) = spawn(_tp_does_not_divide, 2, str(folder), str(tmp_path / "run"),
                                          str(demo_data["instruct"]), tp=2)
    assert (rank0, rank1) == (2, 2), (err0, err1)
    assert err0.count("\n") == 1 and "Traceback" not in err0, err0
    assert "parallel.tp=2 does not divide" in err0 and "num_key_value_heads=1" in err0
    assert err1 == ""
    assert json.loads((folder / "config.json").read_text())["text_config"]["num_key_value_heads"] == 1
