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
    ("train.max_steps=-1", "train.max_steps must be >= 0 (null: train.epochs epochs), got -1", True),
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


# ------------------------------------------------------------------ numeric ranges

def _numeric_keys():
    """(section, key, Range or None, element type) for every int/float key (also Optional and tuples)."""
    import dataclasses
    import typing

    from lingshu_fast.config import Config

    out = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        hints = typing.get_type_hints(cls)
        for key in dataclasses.fields(cls):
            tp = hints[key.name]
            args = [a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)]
            if typing.get_origin(tp) in (tuple, list):
                args = list(typing.get_args(tp))
            numeric = [a for a in args if a in (int, float)]
            if numeric:
                out.append((section.name, key.name, key.metadata.get("range"), numeric[0]))
    return out


def test_every_numeric_key_declares_its_range():
    """Pins: a numeric key cannot be added without an allowed range (`config.num(default, ge=..)`),
    so no number reaches the trainer unchecked (min_lr_ratio=-5 once drove the LR negative)."""
    keys = _numeric_keys()
    assert len(keys) > 40
    missing = [f"{s}.{k}" for s, k, rng, _ in keys if rng is None]
    assert not missing, f"declare these with config.num(default, ge=/gt=/le=/lt=): {missing}"


@pytest.mark.parametrize("override, expected", [
    ("optim.min_lr_ratio=-5", "optim.min_lr_ratio must be >= 0 and <= 1"),
    ("train.stage=9", "train.stage must be >= 1 and <= 4"),
    ("checkpoint.keep=-1", "checkpoint.keep must be >= 0 (0 keeps all), got -1"),
    ("optim.lr=-0.001", "optim.lr must be >= 0, got -0.001"),
    ("optim.lr=nan", "optim.lr must be >= 0, got nan"),
    ("optim.lr=.inf", "optim.lr must be >= 0, got inf"),
    ("optim.betas=[0.9,1.5]", "optim.betas must be >= 0 and < 1, got [0.9, 1.5]"),
    ("optim.lr_vision=-1", "optim.lr_vision must be >= 0"),
    ("data.max_length=0", "data.max_length must be >= 1, got 0"),
    ("rl.top_p=0", "rl.top_p must be > 0 and <= 1"),
    ("run.seed=-3", "run.seed must be >= 0"),
])
def test_out_of_range_numbers_are_one_line_errors(override, expected):
    """Pins: values that used to be accepted silently (a negative LR floor, stage 9, keep=-1, a NaN
    LR, a beta of 1.5, max_length 0) are one-line errors naming the override, the key and its range."""
    msg = _one_line_error("tiny-sft", [override])
    assert expected in msg and f"override {override!r}" in msg


def test_every_numeric_key_refuses_just_outside_and_takes_its_bounds():
    """Pins the generic check for every declared key (tuples element-wise, Optional keys too): the
    value just outside each bound is refused, the bound itself (when inclusive) accepted; a recipe
    file's bad value names the file; a Config changed in code is caught by validate()."""
    from lingshu_fast.config import Config, validate

    for section, key, rng, elem in _numeric_keys():
        width = 2 if key == "betas" else 1
        for bound, inside, outside in ((rng.ge, True, -1), (rng.gt, False, -1), (rng.le, True, 1),
                                       (rng.lt, False, 1)):
            if bound is None or bound >= 2**62:
                continue
            step = 1 if elem is int else 1e-3
            bad = bound + outside * step if inside else bound
            value = "[" + ",".join([str(bad)] * width) + "]" if width > 1 else str(bad)
            with pytest.raises(ConfigError, match=f"{section}.{key} must be"):
                load_config("tiny-sft", [f"{section}.{key}={value}"])
            if inside and not (section, key) in (("data", "min_pixels"), ("data", "max_pixels")):
                ok = "[" + ",".join([str(bound)] * width) + "]" if width > 1 else str(bound)
                load_config("tiny-sft", [f"{section}.{key}={ok}"])  # the inclusive bound is allowed
    cfg = Config()
    cfg.optim.min_lr_ratio = -5.0
    with pytest.raises(ConfigError, match="optim.min_lr_ratio must be"):
        validate(cfg)


def test_recipe_range_error_names_the_file(tmp_path):
    """Pins: a range error in a recipe file names that file (the check runs where the value is set)."""
    recipe = tmp_path / "bad_stage.yaml"
    recipe.write_text("inherit: tiny-sft\ntrain:\n  stage: 9\n")
    msg = _one_line_error(str(recipe))
    assert str(recipe) in msg and "train.stage must be >= 1 and <= 4" in msg
