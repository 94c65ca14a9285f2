"""The layouts N GPUs and the model allow, and each one's predicted memory and speed (a MODEL).

A layout is (TP, PP, DP, virtual stages, activation checkpointing) plus the pipeline schedule and
sequence parallelism. Allowed: TP divides the heads, KV heads, MLP width and vocabulary as the model
checks (model/config.py; the ViT is replicated where TP does not divide it, e.g. its MLP of 3420 at
TP=8) and stays within a node; PP x virtual stages <= decoder layers; DP = N / (TP x PP) divides the
global batch (stages 1-3) or rl.rollout_batch x rl.updates_per_rollout (stage 4); 1F1B needs at least
PP micro-batches per DP rank, interleaved 1F1B whole rounds. Enumerated layouts use sequence
parallelism whenever TP > 1; the recipe's own layout is evaluated as written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from lingshu_fast.config import Config
from lingshu_fast.model.config import check_tensor_parallel
from lingshu_fast.model.flops import forward_flops, pipeline_layer_split
from lingshu_fast.parallel.pipeline import microbatch_count
from lingshu_fast.plan import memory as M
from lingshu_fast.plan.activations import BACKENDS, RankPieces, Split, Widths
from lingshu_fast.plan.hardware import GPUS_PER_NODE, Hardware
from lingshu_fast.plan.steptime import TimeInputs, rollout_seconds, training_step_seconds
from lingshu_fast.plan.workload import representative_microbatch

POLICIES = ("none", "selective", "full")
VIRTUAL_STAGES = (2, 4)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    vp: int = 1
    activation_checkpointing: str = "none"
    schedule: str = "1f1b"
    sequence_parallel: bool = False

    def describe(self) -> str:
        sp = "+sp" if self.sequence_parallel and self.tp > 1 else ""
        sched = f" {self.schedule}" if self.pp > 1 else ""
        return (f"tp={self.tp}{sp} pp={self.pp} dp={self.dp} vp={self.vp}{sched} "
                f"checkpointing={self.activation_checkpointing}")


@dataclass
class LayoutPlan:
    layout: Layout
    memory: M.MemoryEstimate
    fits: bool
    step_s: float
    tokens_per_s_per_gpu: float
    recipe: bool = False

    def as_json(self) -> dict:
        lay = self.layout
        return {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "vp": lay.vp,
                "activation_checkpointing": lay.activation_checkpointing, "schedule": lay.schedule,
                "sequence_parallel": lay.sequence_parallel and lay.tp > 1, "fits": self.fits,
                "mem_gb": self.memory.gb(), "tokens_per_s_per_gpu": round(self.tokens_per_s_per_gpu, 1),
                "step_s": round(self.step_s, 3), "recipe": self.recipe,
                "detail_gb": {k: round(v / M.GIB, 2) for k, v in self.memory.detail.items()}}


def recipe_layout(cfg: Config, gpus: int) -> Layout:
    p = cfg.parallel
    return Layout(p.tp, p.pp, max(1, gpus // (p.tp * p.pp)), p.virtual_stages, cfg.model.activation_checkpointing,
                  p.pp_schedule, p.sequence_parallel)


def layout_problem(cfg: Config, hf_config, lay: Layout, gpus: int) -> Optional[str]:
    """Why `lay` cannot run on `gpus` GPUs (one line), or None."""
    layers = hf_config.text_config.num_hidden_layers
    if lay.tp * lay.pp * lay.dp != gpus:
        return f"tp x pp x dp = {lay.tp * lay.pp * lay.dp} is not the {gpus} GPUs"
    if lay.tp > GPUS_PER_NODE:
        return f"tp={lay.tp} spans more than a node ({GPUS_PER_NODE} GPUs)"
    try:
        check_tensor_parallel(hf_config, lay.tp)
    except ValueError as err:
        return str(err)
    if lay.pp * lay.vp > layers:
        return f"pp x vp = {lay.pp * lay.vp} stages > {layers} decoder layers"
    if cfg.train.stage == 4:
        need = lay.dp * cfg.rl.updates_per_rollout
        split_ok = cfg.rl.rollout_batch % need == 0
        return None if split_ok else f"rl.rollout_batch does not split over dp x updates = {need}"
    if cfg.train.global_microbatches % lay.dp:
        return f"train.global_microbatches={cfg.train.global_microbatches} is not divisible by dp={lay.dp}"
    per_rank = cfg.train.global_microbatches // lay.dp
    if lay.pp > 1 and lay.schedule == "1f1b" and per_rank < lay.pp:
        return f"1F1B needs >= pp={lay.pp} micro-batches per DP rank, the global batch gives {per_rank}"
    if lay.schedule == "interleaved" and microbatch_count(per_rank, "interleaved", lay.pp) != per_rank:
        return f"interleaved 1F1B needs whole rounds of micro-batches ({per_rank} per DP rank)"
    return None


def candidate_layouts(cfg: Config, hf_config, gpus: int) -> list[Layout]:
    base_schedule = "gpipe" if cfg.parallel.pp_schedule == "gpipe" else "1f1b"
    out = []
    for tp in [d for d in range(1, gpus + 1) if gpus % d == 0]:
        for pp in [d for d in range(1, gpus // tp + 1) if (gpus // tp) % d == 0]:
            shapes = [(1, base_schedule)] + ([(v, "interleaved") for v in VIRTUAL_STAGES] if pp > 1 else [])
            for vp, schedule in shapes:
                for policy in POLICIES:
                    lay = Layout(tp, pp, gpus // (tp * pp), vp, policy, schedule, tp > 1)
                    if layout_problem(cfg, hf_config, lay, gpus) is None:
                        out.append(lay)
    return out


def _rank_pieces(hf_config, cfg: Config, lay: Layout) -> list[RankPieces]:
    layers = hf_config.text_config.num_hidden_layers
    if lay.pp == 1:
        return [RankPieces(tuple(range(layers)), True, True)]
    tokens = cfg.data.max_tokens_per_microbatch  # the trainer's split (train/layout.py)
    split = pipeline_layer_split(hf_config, lay.pp * lay.vp, seq_len=tokens, image_patches=tokens)
    ranks = []
    for r in range(lay.pp):
        ids = [i for c in range(lay.vp) for i in range(*split[c * lay.pp + r])]
        ranks.append(RankPieces(tuple(ids), r == 0, r == lay.pp - 1))
    return ranks


def _in_flight(lay: Layout, rank: int, m: int) -> float:
    if lay.pp == 1:
        return 1.0
    if lay.schedule == "gpipe":
        return float(m)
    if lay.schedule == "interleaved":  # warm-up forwards of chunks (1/vp of the rank each) plus the running one
        return min(m * lay.vp, (lay.pp - rank - 1) * 2 + (lay.vp - 1) * lay.pp + 1) / lay.vp
    return float(min(m, lay.pp - rank))


def _rank_share(hf_config, mb, pieces: list[RankPieces]) -> list[float]:
    """Each rank's share of a micro-batch's forward FLOPs (layers, + ViT on the first, + head on the last)."""
    fwd = forward_flops(hf_config, mb.seq_lens, mb.grid_thw)
    t = hf_config.text_config
    head = 2.0 * mb.tokens * t.hidden_size * t.vocab_size
    per_layer = (fwd["llm"] - head) / t.num_hidden_layers
    total = fwd["llm"] + fwd["vit"]
    return [(per_layer * len(p.layer_ids) + (fwd["vit"] if p.first else 0) + (head if p.last else 0)) / total
            for p in pieces]


def _rank_estimate(cfg: Config, hf_config, lay: Layout, split: Split, mb, pieces: RankPieces, in_flight: float,
                   backend: str, device_bytes: float) -> tuple[M.MemoryEstimate, M.StateBytes, float]:
    """One pipeline rank's memory estimate, its training state, and (stage 4) a generation row's bytes."""
    w, param_bytes = Widths.of(hf_config), BACKENDS[backend]
    rl = cfg.train.stage == 4
    numel = M.rank_param_numel(hf_config, split, pieces)
    state = M.state_bytes(numel, cfg, dp=lay.dp, param_bytes=param_bytes, with_reference=rl and cfg.rl.beta != 0)
    act, ws = M.activation_terms(w, mb.tokens, mb.patches, pieces, cfg, policy=lay.activation_checkpointing,
                                 backend=backend, split=split, vit_depth=hf_config.vision_config.depth,
                                 in_flight=in_flight)
    # the schedule's static send/receive buffers: activations and gradients, per chunk
    pipe = 2 * lay.vp * mb.tokens * w.hidden / split.residual_div * param_bytes * 2 if lay.pp > 1 else 0.0
    rollout, fits_rollout, per_row = 0.0, True, 0.0
    if rl:
        full, per_row = M.rollout_bytes(w, cfg, layers=len(pieces.layer_ids), split=split, dp=lay.dp, backend=backend)
        budget = M.rollout_budget_bytes(cfg, device_bytes, state.params + state.grads + state.optimizer)
        rollout, fits_rollout = min(full, budget), budget >= per_row
    est = M.MemoryEstimate(state.params, state.grads, state.optimizer, act, ws, pipe, rollout, 0.0, fits_rollout)
    est.reserve = M.reserve_bytes(est.total)
    est.detail = {"workspace": ws, "pipeline_buffers": pipe, "rollout": rollout, "reserve": est.reserve}
    return est, state, per_row


def _rl_seconds(cfg: Config, hf_config, hw: Hardware, x: TimeInputs, update_s: float, rows: int,
                rollout_bytes: float, per_row: float, param_bytes: int) -> float:
    """One rollout (generation in as many passes as the budget allows) and its rl.updates_per_rollout updates."""
    update_s *= 4 / 3 if cfg.rl.beta != 0 else 1.0  # the reference model's forward over the same tokens
    rows_per_pass = max(1, min(rows, int(rollout_bytes // per_row) if per_row else rows))
    logits_row = hf_config.text_config.vocab_size * (param_bytes + 8)
    kv_token_row = (per_row - logits_row) / cfg.data.max_length if per_row else 0.0
    prompt_len = cfg.data.max_length - cfg.rl.max_new_tokens
    generate_s = rollout_seconds(hf_config, hw, x, rows=rows, rows_per_pass=rows_per_pass,
                                 generations=cfg.rl.num_generations, prompt_len=prompt_len,
                                 new_tokens=cfg.rl.max_new_tokens, kv_bytes_per_token_row=kv_token_row)
    return cfg.rl.updates_per_rollout * update_s + generate_s


def evaluate(cfg: Config, hf_config, hw: Hardware, lay: Layout, *, backend: str = "fused",
             recipe: bool = False) -> LayoutPlan:
    """Predicted per-rank peak memory (the heaviest rank) and tokens/s/GPU of `lay` on `hw`."""
    split = Split(lay.tp, lay.sequence_parallel and lay.tp > 1, check_tensor_parallel(hf_config, lay.tp))
    mb = representative_microbatch(cfg, lay.pp, merge=hf_config.vision_config.spatial_merge_size)
    rl = cfg.train.stage == 4
    rows = math.ceil(cfg.rl.rollout_batch / lay.dp) * cfg.rl.num_generations if rl else 0
    if rl:  # an update's sequences, packed into micro-batches of the token budget
        m = max(1, math.ceil(rows * cfg.data.max_length / cfg.rl.updates_per_rollout / mb.tokens))
    else:
        m = cfg.train.global_microbatches // lay.dp
    pieces = _rank_pieces(hf_config, cfg, lay)
    device = hw.memory_gb * M.GIB
    ranks = [_rank_estimate(cfg, hf_config, lay, split, mb, p, _in_flight(lay, r, m), backend, device)
             for r, p in enumerate(pieces)]
    est, state, per_row = max(ranks, key=lambda r: r[0].total)
    shares = _rank_share(hf_config, mb, pieces)
    top = max(range(len(pieces)), key=lambda r: shares[r])
    x = TimeInputs(lay.tp, lay.pp, lay.dp, lay.vp, lay.schedule, lay.activation_checkpointing,
                   cfg.model.checkpoint_every_k_layers, split.sp, split.vit_tp > 1, shares[top], pieces[top].first,
                   len(pieces[top].layer_ids), state.trainable_numel, state.params / (2 if rl and cfg.rl.beta else 1),
                   cfg.optim.distributed if cfg.optim.distributed is not None else lay.dp > 1,
                   cfg.optim.overlap_param_gather)
    step = training_step_seconds(hf_config, mb, hw, x, m)
    if rl:
        step = _rl_seconds(cfg, hf_config, hw, x, step, rows, est.rollout, per_row, BACKENDS[backend])
        tokens = rows * lay.dp * cfg.data.max_length
    else:
        tokens = cfg.train.global_microbatches * mb.tokens
    fits = est.fits_rollout and est.total <= device
    return LayoutPlan(lay, est, fits, step, tokens / step / hw.gpus, recipe)


def plan_layouts(cfg: Config, hf_config, hw: Hardware, *, backend: str = "fused") -> list[LayoutPlan]:
    """Every allowed layout (and the recipe's own, flagged), fitting ones first by predicted tokens/s/GPU."""
    plans = [evaluate(cfg, hf_config, hw, lay, backend=backend) for lay in candidate_layouts(cfg, hf_config, hw.gpus)]
    own = recipe_layout(cfg, hw.gpus)
    if layout_problem(cfg, hf_config, own, hw.gpus) is None:
        match = [p for p in plans if p.layout == own]
        if match:
            match[0].recipe = True
        else:
            plans.append(evaluate(cfg, hf_config, hw, own, backend=backend, recipe=True))
    return sorted(plans, key=lambda p: (not p.fits, -p.tokens_per_s_per_gpu if p.fits else p.memory.total))

