"""Config errors (lingshu_fast.config): every mistake is one ConfigError line naming where and what."""
from __future__ import annotations

import pytest

from lingshu_fast.cli import main as cli_main
from lingshu_fast.config import ConfigError, load_config


def _one_line_error(recipe, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(recipe, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg, "config errors must be one line (the CLI prints them without a traceback)"
    return msg


# The third field: whether the message quotes the override (cross-key checks run after merging
# all sources, so they name the key but not where it came from).
@pytest.mark.parametrize("override, expected, names_override", [
    ("optim.lrr=1", "unknown key in [optim] 'lrr' (did you mean 'lr'?)", True),
    ("optm.lr=1", "unknown section 'optm' (did you mean 'optim'?)", True),
    ("optim.lr=fast", "optim.lr: 'fast' is not float", True),
    ("parallel.tp=1.5", "parallel.tp: 1.5 is not int", True),
    ("run.progress=maybe", "'maybe' is not a boolean", True),
    ("optim.schedule=cosin", "choose one of cosine, constant, linear (did you mean 'cosine'?)", True),
    ("optim.betas=[0.9]", "optim.betas: expected 2 values, got 1", True),
    ("model.freeze=[llm,text]", "'text' is not a module group; choose from vision, merger, llm", False),
    ("train.max_steps", "must look like section.key=value", True),
    ("a.b.c=1", "the key must be section.key", True),
    ("train.max_steps=-1", "train.max_steps must be >= 0, got -1", True),
])
def test_override_errors_name_key_and_fix(override, expected, names_override):
    """Pins: a wrong override names the override, the key and what is allowed (with a did-you-mean
    for typos), in one line."""
    msg = _one_line_error("tiny-sft", [override])
    assert expected in msg
    assert (f"override {override!r}" in msg) == names_override


def test_recipe_file_errors_name_file_and_line(tmp_path):
    """Pins: an unknown key in a YAML recipe names the file; broken YAML names file and line; an
    unknown recipe name lists the known ones; a recipe inheriting itself is caught, not recursed."""
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("inherit: tiny-sft\noptim:\n  learning_rate: 1e-4\n")
    msg = _one_line_error(str(bad_key))
    assert str(bad_key) in msg and "'learning_rate'" in msg and "allowed: lr" in msg

    bad_yaml = tmp_path / "bad_yaml.yaml"
    bad_yaml.write_text("optim:\n  lr: 1e-4\n  betas: [0.9, 0.95\ntrain:\n  max_steps: 3\n")
    msg = _one_line_error(str(bad_yaml))
    assert f"{bad_yaml}:" in msg and "invalid YAML" in msg

    msg = _one_line_error("tiny-sf")
    assert "did you mean 'tiny-sft'?" in msg and "lingshu-7b-stage3" in msg

    loop = tmp_path / "loop.yaml"
    loop.write_text(f"inherit: {loop}\n")
    assert "inherits itself" in _one_line_error(str(loop))

    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    assert "must be a mapping" in _one_line_error(str(not_mapping))


def test_child_recipe_overrides_parent_key_by_key(tmp_path):
    """Pins inheritance semantics the recipes rely on: a child sets single keys of a section and
    keeps the parent's others (tiny-stage1 sets optim.lr_vision and keeps tiny-base's lr)."""
    child = tmp_path / "child.yaml"
    child.write_text("inherit: tiny-base\noptim:\n  lr_merger: 5.0e-4\n")
    cfg = load_config(str(child), ["optim.warmup_steps=7"])
    base = load_config("tiny-base")
    assert cfg.optim.lr_merger == 5e-4 and cfg.optim.lr == base.optim.lr and cfg.optim.warmup_steps == 7


def test_cli_prints_config_error_as_one_line(capsys):
    """Pins: the CLI turns a ConfigError into one stderr line and exit status 2, never a traceback."""
    status = cli_main(["train", "tiny-sft", "optim.schedule=cosin"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("lingshu-fast: config error:") and "Traceback" not in err
