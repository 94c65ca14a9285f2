"""Stage 4 (GRPO) under pipeline parallelism: the update, the log-prob passes and the whole loop
against the single-process run.

Layouts differ only in the order of floating-point reductions (TP splits matmuls and the
vocabulary; PP moves the same tensors between processes and pads each micro-batch with an
untrained segment that varlen attention keeps apart), so fp32 losses, statistics and gradient
norms agree to ~1e-6 relative; the bars are 1e-5 (log-probs, absolute, values ~7) and 1e-4.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lingshu_fast.parallel.spawn import spawn
from lingshu_fast.rl.rewards import register_reward, registered_rewards


def space_start_reward(response: str, sample: dict) -> float:
    return float(response.startswith(" "))


if "space_start" not in registered_rewards():  # test_rl.py registers the same synthetic task
    register_reward("space_start", inline=True)(space_start_reward)

pytestmark = pytest.mark.usefixtures("world_of_one")

BUDGET = 128  # data.max_tokens_per_microbatch: the pipeline's static micro-batch


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from lingshu_fast.data.demo_data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("rlpp_data"))


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory) -> Path:
    """The tiny model with 4 decoder layers (pp=2 x 2 interleaved chunks needs 4) and tied embeddings,
    so the pipeline's tied-embedding gradient sync is part of what is compared."""
    from lingshu_fast.model.testing import save_tiny_tied_model

    return save_tiny_tied_model(tmp_path_factory.mktemp("tiny4"))


# ------------------------------------------------------------------ one update on a fixed rollout

def _fixed_rollout(config, token_multiple: int):
    """Two image prompts and a text one, 4 responses each, advantages drawn once: the same on every
    rank and layout (a generator with a fixed seed), packed at the pipeline's budget."""
    from lingshu_fast.rl.step import pack_sequences
    from lingshu_fast.rl.testing import rl_prompt_parts

    gen = torch.Generator().manual_seed(0)
    prompts = rl_prompt_parts(config, gen, [((1, 4, 4), 9, 4), ((1, 4, 6), 8, 5), (None, 14, 0)])
    seq_prompt = np.repeat(np.arange(3), 4)
    responses = [torch.randint(3, 900, (int(n),), generator=gen).tolist()
                 for n in torch.randint(2, 9, (len(seq_prompt),), generator=gen)]
    adv = torch.randn(len(responses), generator=gen).tolist()
    pack = lambda seqs: pack_sequences(prompts, seq_prompt, responses, adv, seqs, BUDGET,  # noqa: E731
                                       token_multiple=token_multiple)
    # update 1: every sequence (several micro-batches); update 2: one micro-batch (1F1B pads it to pp)
    return [pack(list(range(len(responses)))), pack([0, 1, 2, 8])]


def _update_on_layout(dims, model_dir, data, run_dir, *extra):
    """Spawned (or in-process for the baseline): two GRPO updates on the fixed rollout, with old
    log-probs (the policy's own, shifted by fixed noise so that the ratio clips) and the reference
    model's; returns per-rank totals, grad norms and the last stage's log-probs."""
    from megatron.core import parallel_state as ps

    from lingshu_fast.config import load_config
    from lingshu_fast.rl.loop import build_rl_state
    from lingshu_fast.rl.step import STAT_KEYS, grpo_closures, norm_count, sequence_logprobs
    from lingshu_fast.train.engine import StepEngine
    from lingshu_fast.train.metrics import SkipTracker

    cfg = load_config("tiny-rl", [f"run.dir={run_dir}", f"data.train=[{data}]", f"model.path={model_dir}",
                                  f"parallel.tp={dims.tp}", f"parallel.pp={dims.pp}", "run.progress=false",
                                  f"data.max_tokens_per_microbatch={BUDGET}", f"data.max_length={BUDGET}",
                                  "rl.beta=0.05", "rl.loss_agg=seq-mean-token-mean", "optim.lr=1e-3", *extra])
    tp_group = ps.get_tensor_model_parallel_group()
    state = build_rl_state(cfg, dims)
    model, ref_model = state.model, state.ref_model
    engine = StepEngine(model, state.optimizer, state.scheduler, state.runner, dims, grad_clip=cfg.optim.grad_clip,
                        skips=SkipTracker(5))
    multiple = model.tp if model.sequence_parallel else 1
    out = {"totals": [], "grad_norm": [], "logprobs": []}
    for u, rmbs in enumerate(_fixed_rollout(model.config, multiple)):
        noise = torch.Generator().manual_seed(100 + u)
        for rmb in rmbs:
            old = sequence_logprobs(model, rmb, temperature=cfg.rl.temperature, tp_group=tp_group)
            ref = sequence_logprobs(ref_model, rmb, temperature=cfg.rl.temperature, tp_group=tp_group)
            shift = torch.zeros(rmb.mb.num_tokens)  # drawn per trained token: independent of SP's padding
            shift[rmb.loss_mask] = 0.3 * torch.randn(rmb.num_masked, generator=noise)
            if old is not None:  # the last stage's rank (every rank without PP)
                rmb.old_logprobs, rmb.ref_logprobs = old + shift, ref
                out["logprobs"].append((old[rmb.loss_mask].tolist(), ref[rmb.loss_mask].tolist()))
        count = sum(norm_count(r, cfg.rl.loss_agg) for r in rmbs)
        result = engine.step(*grpo_closures(state.runner, rmbs, cfg.rl), count=count, stat_keys=STAT_KEYS)
        out["totals"].append({"loss": result.loss, **result.stats})
        out["grad_norm"].append(result.grad_norm)
    state.export(Path(run_dir) / "hf")
    return out


def _hf_tensors(folder: Path) -> dict:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_pipeline_rl_update_equals_single_process(tmp_path, demo_data, four_layer_model):
    """Pins: under PP=2 (1F1B) and TP=2 x PP=2 interleaved (2 chunks per rank, sequence parallel),
    the GRPO update gives the single process's loss, KL, clip fraction, gradient norm and updated
    weights: the first stage shares each prompt's image encoding as `forward_hidden` does, the last
    computes the loss of the right micro-batch with its own advantages and log-probs, micro-batches
    padded to the static budget and an update of one micro-batch padded with an empty one train
    nothing extra, the totals reach every rank, and the tied embedding's two copies move together.
    The old/reference log-prob passes (stage by stage) equal the single-stage ones. Tolerances: see
    the module docstring. Weights after two AdamW steps: Adam's first steps move each weight by
    ~lr * g / (|g| + eps), so components with |g| near eps turn 1e-6 gradient differences into
    visible moves (max 8e-5 observed at lr 1e-3); per tensor, the distance to the single process's
    weights stays below 4e-4 of how far the update moved them (bar 1e-2; a lost or misplaced
    micro-batch gradient moves it by O(1))."""
    from lingshu_fast.parallel.state import current_dims

    data, model_dir = str(demo_data["rl"]), str(four_layer_model)
    base = _update_on_layout(current_dims(), model_dir, data, str(tmp_path / "base"))
    layouts = {
        "pp2": spawn(_update_on_layout, 2, model_dir, data, str(tmp_path / "pp2"), pp=2),
        "tp2pp2": spawn(_update_on_layout, 4, model_dir, data, str(tmp_path / "tp2pp2"),
                        "parallel.pp_schedule=interleaved", "parallel.virtual_stages=2",
                        "parallel.sequence_parallel=true", tp=2, pp=2),
    }
    # both terms in play: the shifted old log-probs clip; the KL is 0 until the policy leaves the reference
    assert base["totals"][0]["clip_frac"] > 0 and base["totals"][1]["kl"] > 0
    want_weights = _hf_tensors(tmp_path / "base" / "hf")
    initial = _hf_tensors(Path(model_dir))
    for name, ranks in layouts.items():
        for rank, got in enumerate(ranks):  # every rank reports the same totals (broadcast from the last stage)
            for want_t, got_t in zip(base["totals"], got["totals"], strict=True):
                assert got_t == pytest.approx(want_t, rel=1e-4, abs=1e-7), (name, rank)
            assert got["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-4), (name, rank)
        holders = [r for r in ranks if r["logprobs"]]
        assert len(holders) == (2 if name == "tp2pp2" else 1)  # the last stage's TP ranks only
        for got in holders:
            for (old_w, ref_w), (old_g, ref_g) in zip(base["logprobs"], got["logprobs"], strict=True):
                np.testing.assert_allclose(old_g, old_w, rtol=0, atol=1e-5)
                np.testing.assert_allclose(ref_g, ref_w, rtol=0, atol=1e-5)
        got_weights = _hf_tensors(tmp_path / name / "hf")
        assert got_weights.keys() == want_weights.keys(), name
        for key, tensor in want_weights.items():
            moved = float((tensor - initial[key]).norm())
            off = float((got_weights[key] - tensor).norm())
            assert moved > 0 and off <= 1e-2 * moved, (name, key, off, moved)


# ------------------------------------------------------------------ the whole loop


def _rl_cfg(run_dir, data, *extra):
    from lingshu_fast.config import load_config

    return load_config("tiny-rl", [f"run.dir={run_dir}", f"data.train=[{data}]", "run.progress=false",
                                   "rl.rewards=[space_start:1.0]", "optim.lr=3.0e-2", "rl.rollout_batch=4",
                                   "rl.num_generations=4", "rl.temperature=1.0", "rl.max_new_tokens=3",
                                   "rl.updates_per_rollout=2", "rl.beta=0.05", "data.max_length=128",
                                   "data.max_tokens_per_microbatch=256", *extra])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _loop_pp2(dims, root, data):
    """Spawned: an uninterrupted 4-step run, and one stopped after 2 steps then resumed to 4."""
    from lingshu_fast.rl.loop import train_rl

    root = Path(root)
    train_rl(_rl_cfg(root / "ref", data, "train.max_steps=4", f"parallel.pp={dims.pp}"), dims)
    train_rl(_rl_cfg(root / "run", data, "train.max_steps=2", f"parallel.pp={dims.pp}"), dims)
    summary = train_rl(_rl_cfg(root / "run", data, "train.max_steps=4", f"parallel.pp={dims.pp}"), dims)
    return summary["steps"]


def test_pipeline_rl_loop_runs_resumes_and_matches_first_rollout(tmp_path, demo_data):
    """Pins: `train_rl` with parallel.pp=2 runs end to end (generation through the pipeline, old and
    reference log-probs stage by stage, updates through the schedule), writes one metrics row per
    step, checkpoints and resumes exactly (resumed == uninterrupted: same layout, same process, so
    1e-6 relative leaves nothing real to hide), and its first rollout samples what the single
    process samples with the same seed (same rewards and lengths; the first update's loss to 1e-4,
    fp32 reduction order only)."""
    from lingshu_fast.parallel.state import current_dims
    from lingshu_fast.rl.loop import train_rl

    assert spawn(_loop_pp2, 2, str(tmp_path), str(demo_data["rl"]), pp=2) == [4, 4]
    train_rl(_rl_cfg(tmp_path / "pp1", demo_data["rl"], "train.max_steps=2"), current_dims())
    ref_rows, rows, single = _rows(tmp_path / "ref"), _rows(tmp_path / "run"), _rows(tmp_path / "pp1")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["step"] for r in ref_rows] == [1, 2, 3, 4]
    for key in ("loss", "reward_mean", "kl", "clip_frac", "grad_norm", "response_len"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in ref_rows], rel=1e-6, abs=1e-9), key
    assert any(r["kl"] > 0 for r in rows) and any(r["loss"] != 0 for r in rows)
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    want, got = _hf_tensors(tmp_path / "ref" / "hf"), _hf_tensors(tmp_path / "run" / "hf")
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    for key in ("reward_mean", "reward_std", "response_len"):
        assert rows[0][key] == single[0][key], key
    assert rows[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-4, abs=1e-7)


def test_pipeline_rl_refuses_sequences_longer_than_the_static_micro_batch():
    """Pins: under PP every micro-batch has the budget's fixed shape, so a prompt + response limit
    (data.max_length) above data.max_tokens_per_microbatch is a one-line ConfigError before any model
    loads (without PP the same settings are fine: a long sequence gets its own micro-batch)."""
    from lingshu_fast.config import ConfigError
    from lingshu_fast.parallel.state import ParallelDims
    from lingshu_fast.rl.loop import _check_layout

    cfg = _rl_cfg("unused", "unused.jsonl", "data.max_length=512", "data.max_tokens_per_microbatch=256")
    dims = lambda pp: ParallelDims(world=pp, rank=0, local_rank=0, tp=1, pp=pp, dp=1, tp_rank=0,  # noqa: E731
                                   pp_rank=0, dp_rank=0)
    with pytest.raises(ConfigError, match=r"data.max_length=512 .* data.max_tokens_per_microbatch=256"):
        _check_layout(cfg, dims(2))
    _check_layout(cfg, dims(1))  # the same settings without PP: no error


def _loop_layout(dims, run_dir, data):
    """Spawned: a 2-step run on this layout; returns the DP size it ran with."""
    from lingshu_fast.rl.loop import train_rl

    train_rl(_rl_cfg(Path(run_dir), data, "train.max_steps=2", f"parallel.pp={dims.pp}"), dims)
    return dims.dp


def test_pipeline_rl_with_data_parallel_equals_data_parallel_alone(tmp_path, demo_data):
    """Pins DP x PP in stage 4: two pipelines (world 4, pp=2, dp=2) take the same prompt shards and
    sampling seeds as DP=2 without pipelining, so the rollouts are identical (rewards and lengths
    exactly) and the updates agree to fp32 reduction order (1e-4 relative): the DP gradient
    all-reduce, the global loss denominator and the metrics' DP sums compose with the pipeline."""
    data = str(demo_data["rl"])
    assert spawn(_loop_layout, 4, str(tmp_path / "dp2pp2"), data, pp=2) == [2, 2, 2, 2]
    assert spawn(_loop_layout, 2, str(tmp_path / "dp2"), data) == [2, 2]
    piped, flat = _rows(tmp_path / "dp2pp2"), _rows(tmp_path / "dp2")
    assert [r["step"] for r in piped] == [r["step"] for r in flat] == [1, 2]
    for key in ("reward_mean", "reward_std", "response_len", "label_tokens"):
        assert [r[key] for r in piped] == [r[key] for r in flat], key
    for key in ("loss", "kl", "clip_frac", "grad_norm"):
        assert [r[key] for r in piped] == pytest.approx([r[key] for r in flat], rel=1e-4, abs=1e-7), key
