"""The shipped recipes (lingshu_fast/recipes/*.yaml): all load, and carry Lingshu's settings."""
from __future__ import annotations

import pytest
import yaml

from lingshu_fast.config import RECIPES_DIR, load_config

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def test_expected_recipes_are_shipped():
    """Pins the recipe names that the CLI docs, the demo and the tests use."""
    expected = {"lingshu-7b-stage1", "lingshu-7b-stage2", "lingshu-7b-stage3", "lingshu-7b-stage4",
                "lingshu-32b-stage1", "lingshu-32b-stage2", "lingshu-32b-stage3", "lingshu-32b-stage4",
                "tiny-base", "tiny-stage1", "tiny-stage2", "tiny-sft", "tiny-rl"}
    assert expected <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads(name):
    """Pins: a shipped recipe with a typo'd key or a bad value would fail only when a user launches
    it; load_config validates every key and type, so loading each one here catches that."""
    cfg = load_config(name)
    assert cfg.optim.warmup_steps >= 0 and cfg.train.stage in (1, 2, 3, 4)
    text = (RECIPES_DIR / f"{name}.yaml").read_text()
    assert text.lstrip().startswith("#"), f"{name}.yaml should open with a comment saying what it is for"
    assert isinstance(yaml.safe_load(text), dict)


def test_lingshu_7b_stage_settings():
    """Pins the Lingshu report's numbers: stage 1 trains vision + merger at 2e-6 / 1e-5 with the LLM
    frozen; stages 2-3 train all weights at 1e-5; AdamW cosine with 100 warm-up steps; length 8192;
    packing in stage 3; each stage starts from the previous stage's HF export."""
    s1, s2, s3 = (load_config(f"lingshu-7b-stage{i}") for i in (1, 2, 3))
    assert s1.train.stage == 1 and s1.model.freeze == ["llm"]
    assert (s1.optim.lr_vision, s1.optim.lr_merger) == (2e-6, 1e-5)
    for cfg in (s2, s3):
        assert cfg.model.freeze == [] and cfg.optim.lr == 1e-5
        assert cfg.optim.lr_vision is None and cfg.optim.lr_merger is None  # follow optim.lr
    for cfg in (s1, s2, s3):
        assert cfg.optim.schedule == "cosine" and cfg.optim.warmup_steps == 100
        assert cfg.data.max_length == 8192 and cfg.data.train  # placeholder paths, not empty
    assert s3.data.pack and not s1.data.pack
    assert s2.model.init_from == "runs/lingshu-7b-stage1/hf"
    assert s3.model.init_from == "runs/lingshu-7b-stage2/hf"
    assert len({s1.run.dir, s2.run.dir, s3.run.dir}) == 3  # stages never resume each other's checkpoints


def test_lingshu_7b_stage4_and_32b():
    """Pins the RL settings (GRPO, 16 generations, beta 1e-3, lr 1e-6, temperature 1, 512 prompts per
    rollout in 4 updates of 128, length 4096, format 0.5 + accuracy 1.0), and the 32B stages: the
    7B stage's settings on the 32B architecture, each starting from the previous 32B stage's export,
    tensor-parallel (their layouts are checked against their hardware in test_plan.py)."""
    s4 = load_config("lingshu-7b-stage4")
    assert s4.train.stage == 4 and s4.optim.lr == 1e-6 and s4.data.max_length == 4096
    rl = s4.rl
    assert (rl.num_generations, rl.beta, rl.temperature, rl.rollout_batch) == (16, 1e-3, 1.0, 512)
    assert rl.rollout_batch // rl.updates_per_rollout == 128
    assert rl.rewards == ["format:0.5", "accuracy:1.0"]
    big = load_config("lingshu-32b-stage3")
    assert big.parallel.tp >= 4 and big.train.stage == 3 and big.data.pack
    assert "32B" in big.model.path and big.optim.lr == 1e-5
    for i in (1, 2, 3, 4):
        cfg, small = load_config(f"lingshu-32b-stage{i}"), load_config(f"lingshu-7b-stage{i}")
        assert cfg.model.architecture == "qwen2.5-vl-32b" and cfg.train.stage == i and cfg.run.hardware
        assert (cfg.optim.lr, cfg.model.freeze, cfg.data.max_length) == (small.optim.lr, small.model.freeze,
                                                                          small.data.max_length)
        assert cfg.model.init_from == (f"runs/lingshu-32b-stage{i - 1}/hf" if i > 1 else None)


def test_tiny_recipes_inherit_base():
    """Pins: the tiny recipes share tiny-base (tiny model/tokenizer, small images), leave data.train
    empty for the demo to fill, and keep the global batch divisible for the (tp, pp, dp) layouts the
    layout-independence test runs; each stage writes to its own run.dir."""
    base = load_config("tiny-base")
    names = ["tiny-stage1", "tiny-stage2", "tiny-sft", "tiny-rl"]
    cfgs = {n: load_config(n) for n in names}
    for name, cfg in cfgs.items():
        assert cfg.model.path == "tiny" and cfg.data.tokenizer == "tiny" and cfg.data.train == []
        assert cfg.data.max_pixels == base.data.max_pixels <= 12544
        assert cfg.train.global_microbatches % 2 == 0 and cfg.model.init_from is None
    assert [cfgs[n].train.stage for n in names] == [1, 2, 3, 4]
    assert cfgs["tiny-stage1"].model.freeze == ["llm"] and cfgs["tiny-sft"].data.pack
    assert len({c.run.dir for c in cfgs.values()}) == 4
    over = load_config("tiny-sft", ["train.max_steps=3", "parallel.tp=2", "data.train=[a.jsonl]"])
    assert over.train.max_steps == 3 and over.parallel.tp == 2 and over.data.train == ["a.jsonl"]
