"""`lingshu-fast plan`: the layouts N GPUs allow, their predicted memory and speed, the recipes against
the hardware they state, and the CLI/JSON contract (DESIGN.md). The memory terms are measured against
the real code in test_plan_activations.py; here the accounting and the layout rules are pinned.
"""
from __future__ import annotations

import json
import math

import pytest

from lingshu_fast.cli import main as cli_main
from lingshu_fast.config import RECIPES_DIR, ConfigError, load_config
from lingshu_fast.model.config import architecture_config
from lingshu_fast.plan.hardware import Hardware, parse_hardware
from lingshu_fast.plan.layouts import Layout, candidate_layouts, evaluate, plan_layouts
from lingshu_fast.plan.memory import GIB
from lingshu_fast.plan.workload import model_config_of

PARAMS_7B = 8_292_166_656  # Qwen2.5-VL-7B-Instruct's safetensors hold 8.29 B parameters
H100 = Hardware(8, "h100", 80.0)


def _plan_json(capsys, *argv):
    rc = cli_main(["plan", *argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("recipe,gpus", [("lingshu-7b-stage3", 8), ("lingshu-32b-stage3", 32)])
def test_plan_json_has_fitting_layouts_with_speed(capsys, recipe, gpus):
    """The issue's done-when: both commands return at least one fitting layout with predicted
    tokens/s/GPU, and the recipe's own layout is among the fitting ones; pins the JSON keys."""
    rc, out = _plan_json(capsys, recipe, "--gpus", str(gpus), "--gpu-memory-gb", "80")
    assert rc == 0 and "MODEL" in out["model"]
    fitting = [lay for lay in out["layouts"] if lay["fits"]]
    assert fitting and out["best"] == fitting[0]
    for lay in out["layouts"]:
        keys = {"tp", "pp", "dp", "vp", "activation_checkpointing", "fits", "mem_gb", "tokens_per_s_per_gpu"}
        assert keys <= set(lay)
        assert set(lay["mem_gb"]) == {"params", "grads", "optimizer", "activations", "other", "total"}
        assert lay["tp"] * lay["pp"] * lay["dp"] == gpus
        parts = sum(lay["mem_gb"][k] for k in ("params", "grads", "optimizer", "activations", "other"))
        assert math.isclose(parts, lay["mem_gb"]["total"], abs_tol=0.05)
        assert (lay["mem_gb"]["total"] <= 80) == lay["fits"]
    assert all(lay["tokens_per_s_per_gpu"] > 0 for lay in fitting)
    speeds = [lay["tokens_per_s_per_gpu"] for lay in fitting]
    assert speeds == sorted(speeds, reverse=True)
    assert out["recipe_layout"]["fits"] and out["recipe_layout"] in fitting


def test_every_shipped_recipe_fits_its_stated_hardware():
    """CI check of the recipes: every lingshu-7b-*/lingshu-32b-* recipe states its hardware, and the
    planner says the recipe's own layout fits it (a recipe edited into an out-of-memory layout fails here)."""
    names = sorted(p.stem for p in RECIPES_DIR.glob("lingshu-*.yaml"))
    assert {f"lingshu-{size}-stage{i}" for size in ("7b", "32b") for i in (1, 2, 3, 4)} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.run.hardware, f"{name} has no run.hardware"
        hw = parse_hardware(cfg.run.hardware)
        plans = plan_layouts(cfg, model_config_of(cfg), hw)
        own = [p for p in plans if p.recipe]
        assert own and own[0].fits, (name, own and own[0].memory.gb())
        assert own[0].layout.tp * own[0].layout.pp * own[0].layout.dp == hw.gpus


def test_layouts_follow_the_model_and_batch_rules():
    """Pins the enumeration: 7B's 28 query / 4 KV heads allow TP 1, 2, 4 but not 8; 32B's 40/8 allow 8
    (the ViT, MLP 3420, then replicated); DP must divide the global batch; PP x vp <= layers; 1F1B
    needs at least PP micro-batches per DP rank."""
    cfg7 = load_config("lingshu-7b-stage3", ["train.global_microbatches=12"])
    lays = candidate_layouts(cfg7, architecture_config("qwen2.5-vl-7b"), 8)
    assert {lay.tp for lay in lays} == {1, 2, 4}
    assert all(12 % lay.dp == 0 for lay in lays) and not any(lay.dp == 8 for lay in lays)
    assert all(12 // lay.dp >= lay.pp for lay in lays if lay.schedule == "1f1b")
    cfg32 = load_config("lingshu-32b-stage3")
    c32 = architecture_config("qwen2.5-vl-32b")
    lays32 = candidate_layouts(cfg32, c32, 32)
    assert 8 in {lay.tp for lay in lays32}
    assert all(lay.pp * lay.vp <= 64 for lay in lays32)
    assert {lay.activation_checkpointing for lay in lays32} == {"none", "selective", "full"}
    assert {lay.vp for lay in lays32 if lay.pp > 1} == {1, 2, 4}


def test_bytes_per_parameter_follow_the_trainer():
    """Pins the accounting of the distributed optimizer (2 + 4 + 12/DP bytes per trainable bf16
    parameter), without it (18), and stage 1's frozen LLM (2 bytes, no gradient or Adam state)."""
    c7 = architecture_config("qwen2.5-vl-7b")
    lay = Layout(1, 1, 8, 1, "full")
    dist = evaluate(load_config("lingshu-7b-stage3"), c7, H100, lay).memory
    assert dist.params == 2 * PARAMS_7B and dist.grads == 4 * PARAMS_7B
    assert dist.optimizer == pytest.approx(12 * PARAMS_7B / 8)
    plain = evaluate(load_config("lingshu-7b-stage3", ["optim.distributed=false"]), c7, H100, lay).memory
    assert plain.optimizer == 12 * PARAMS_7B
    frozen = evaluate(load_config("lingshu-7b-stage1"), c7, H100, lay).memory
    vision_merger = 631_975_680 + 44_574_464
    assert frozen.params == 2 * PARAMS_7B and frozen.grads == 4 * vision_merger
    assert frozen.optimizer == pytest.approx(12 * vision_merger / 8)


def test_checkpointing_and_pipeline_schedules_change_memory_and_time():
    """Pins the directions the model must get right: recomputation trades memory for time (full <
    selective < none in memory, the reverse in time); 1F1B's first stage holds up to PP micro-batches,
    interleaved more (Megatron's 1 + (pp-1)/(pp*vp)), GPipe all of them."""
    cfg, c7 = load_config("lingshu-7b-stage3"), architecture_config("qwen2.5-vl-7b")
    runs = {p: evaluate(cfg, c7, H100, Layout(2, 1, 4, 1, p, "1f1b", True)) for p in ("none", "selective", "full")}
    assert runs["full"].memory.activations < runs["selective"].memory.activations < runs["none"].memory.activations
    assert runs["full"].step_s > runs["selective"].step_s > runs["none"].step_s
    act = {s: evaluate(cfg, c7, H100, Layout(2, 2, 2, v, "none", s, True)).memory.activations
           for s, v in (("1f1b", 1), ("interleaved", 2), ("gpipe", 1))}
    assert act["1f1b"] < act["interleaved"] < act["gpipe"]


def test_stage4_rollout_buffers_are_capped_by_the_budget():
    """Pins the KV term: prompts x G rows x data.max_length x layers x 2 x kv_heads/tp x head_dim x 2
    bytes (+ one decode step's logits) per rank, capped by rl.rollout_memory_gb."""
    c7 = architecture_config("qwen2.5-vl-7b")
    lay = Layout(2, 1, 4, 1, "full", "1f1b", True)
    big = evaluate(load_config("lingshu-7b-stage4", ["rl.rollout_memory_gb=100000"]), c7, H100, lay).memory
    rows = 512 // 4 * 16
    kv = rows * 4096 * 28 * 2 * (4 // 2) * 128 * 2
    logits = rows * 152064 * (2 + 4 + 4)
    assert big.detail["rollout"] == kv + logits
    capped = evaluate(load_config("lingshu-7b-stage4", ["rl.rollout_memory_gb=6"]), c7, H100, lay)
    assert capped.memory.detail["rollout"] == 6 * GIB and capped.fits
    tiny_budget = evaluate(load_config("lingshu-7b-stage4", ["rl.rollout_memory_gb=0.001"]), c7, H100, lay)
    assert not tiny_budget.fits  # not even one row's cache fits: generation cannot run


def test_model_path_config_wins_over_architecture(tmp_path):
    """Pins: with model.path holding a config.json, plan reads it (here a 32B config under a 7B recipe)."""
    shipped = RECIPES_DIR.parent / "model" / "architectures" / "qwen2.5-vl-32b.json"
    (tmp_path / "config.json").write_text(shipped.read_text())
    cfg = load_config("lingshu-7b-stage3", [f"model.path={tmp_path}", "model.init_from=null"])
    assert model_config_of(cfg).text_config.num_hidden_layers == 64
    assert model_config_of(load_config("tiny-sft")) is None


def test_plan_text_table_and_hardware_parsing(capsys):
    """Pins the human output (model disclaimer, ranked table, best, the recipe's row) and the
    run.hardware contract (config validates it; the planner reads GPUs, card and memory)."""
    assert cli_main(["plan", "lingshu-7b-stage3"]) == 0
    text = capsys.readouterr().out
    assert "MODEL" in text and "8x H100 80GB" in text and "best: " in text and "<- recipe" in text
    assert "tokens/s/GPU" in text.splitlines()[3]
    assert parse_hardware("32x h200 141GB") == Hardware(32, "h200", 141.0)
    with pytest.raises(ConfigError, match="run.hardware"):
        load_config("tiny-sft", ["run.hardware=eight H100s"])
    assert cli_main(["plan", "tiny-sft"]) == 2  # no architecture: a one-line config error
    assert "model.architecture" in capsys.readouterr().err


def test_new_keys_are_validated():
    """Pins the keys' one-line errors: memory budgets must be positive, the architecture one of the
    shipped configs, and each shipped config must be one the config accepts (one list in two places)."""
    import typing

    from lingshu_fast.config import ModelConfig
    from lingshu_fast.model.config import architecture_names

    for bad, key in (("rl.rollout_memory_gb=0", "rl.rollout_memory_gb"), ("train.device_memory_gb=-1",
                     "train.device_memory_gb"), ("model.architecture=qwen2.5-vl-14b", "model.architecture")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("tiny-sft", [bad])
    literal = typing.get_args(typing.get_type_hints(ModelConfig)["architecture"])[0]
    assert sorted(typing.get_args(literal)) == architecture_names()
