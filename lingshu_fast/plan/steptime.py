"""Step time of one layout: a MODEL from FLOPs, link bandwidths and the pipeline schedule (hardware.py
holds every assumed figure).

Stages 1-3, per step:
- compute: training FLOPs of a micro-batch (model/flops.py: 3 x forward) plus what the checkpointing
  policy runs again (full: the layers' forward; selective: the attention scores), the heaviest
  pipeline rank's share (the trainer's layer split), at the card's bf16 peak x MFU_ASSUMED, over TP;
- tensor parallelism: 4 ring all-reduces (or all-gather + reduce-scatter) of [T, H] per decoder layer
  and micro-batch (6 with full recompute), likewise per ViT block when the tower is sharded, over NVLink;
- pipeline: activations and their gradients between stages (NVLink inside a node, else InfiniBand);
  (m + pp - 1) micro-batch slots for 1F1B and GPipe, (m + (pp - 1)/vp) interleaved;
- data parallelism: reduce-scatter of the fp32 main gradients and all-gather of the bf16 parameters
  (all-reduce without the distributed optimizer), over NVLink when the group fits a node; the gradient
  reduction overlaps the last micro-batch's backward (not under the interleaved schedule);
- the optimizer: the owned fp32 state read and written once at HBM bandwidth.
Stage 4, per rollout: prefill at the training efficiency, decode steps bound by reading the weights and
the KV cache at DECODE_HBM_EFFICIENCY (the pipeline stages run one after the other while generating),
in as many passes as the rollout memory budget needs, then rl.updates_per_rollout updates over the
rollout's tokens (policy fwd+bwd, reference forward); tokens/s/GPU counts prompt + response tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lingshu_fast.model.flops import attention_flops, forward_flops
from lingshu_fast.plan.hardware import (
    COLLECTIVE_LATENCY_S,
    DECODE_HBM_EFFICIENCY,
    GPUS_PER_NODE,
    LAUNCH_S_PER_LAYER,
    LINK_EFFICIENCY,
    MFU_ASSUMED,
    Hardware,
)
from lingshu_fast.plan.workload import MicroBatch


@dataclass(frozen=True)
class TimeInputs:
    """What the time model needs of a layout beyond the hardware (filled by layouts.py)."""
    tp: int
    pp: int
    dp: int
    vp: int
    schedule: str
    policy: str
    every_k: int
    sp: bool
    vit_sharded: bool
    heaviest_share: float  # the heaviest pipeline rank's share of the forward FLOPs
    heaviest_is_first: bool  # that rank holds the ViT
    rank_layers: int  # decoder layers on that rank
    trainable_numel: int  # on that rank
    rank_param_bytes: float  # that rank's parameter bytes (decode reads them every step)
    distributed: bool
    overlap_param_gather: bool


def _bw(hw: Hardware, intra_node: bool) -> float:
    return (hw.spec.nvlink_gb_s if intra_node else hw.spec.ib_gb_s) * 1e9 * LINK_EFFICIENCY


def _ring_s(nbytes: float, ranks: int, bw: float, all_reduce: bool) -> float:
    if ranks <= 1:
        return 0.0
    return (2.0 if all_reduce else 1.0) * (ranks - 1) / ranks * nbytes / bw + COLLECTIVE_LATENCY_S


def _recompute_fraction(policy: str, every_k: int, layers: int) -> float:
    return 0.0 if policy == "none" else math.ceil(layers / every_k) / layers


def microbatch_seconds(config, mb: MicroBatch, hw: Hardware, x: TimeInputs) -> tuple[float, float]:
    """(seconds of one micro-batch on the heaviest rank: compute + TP + pipeline transfers, its compute
    share alone)."""
    fwd = forward_flops(config, mb.seq_lens, mb.grid_thw)
    t = config.text_config
    frac = _recompute_fraction(x.policy, x.every_k, t.num_hidden_layers)
    head = 2.0 * mb.tokens * t.hidden_size * t.vocab_size
    if x.policy == "full":
        extra = frac * (fwd["llm"] - head + fwd["vit"])
    elif x.policy == "selective":
        extra = frac * attention_flops(config, mb.seq_lens, mb.grid_thw)
    else:
        extra = 0.0
    flops = (3.0 * (fwd["llm"] + fwd["vit"]) + extra) * x.heaviest_share
    compute = flops / (x.tp * hw.spec.bf16_tflops * 1e12 * MFU_ASSUMED[hw.card])
    nvlink = _bw(hw, True)
    per_layer = 6 if x.policy == "full" else 4
    tp_s = x.rank_layers * per_layer * _ring_s(mb.tokens * t.hidden_size * 2, x.tp, nvlink, all_reduce=True)
    if x.vit_sharded and x.heaviest_is_first and mb.patches:
        v = config.vision_config
        tp_s += v.depth * per_layer * _ring_s(mb.patches * v.hidden_size * 2, x.tp, nvlink, all_reduce=True)
    p2p = 0.0
    if x.pp > 1:
        intra = x.tp * x.dp * x.pp <= GPUS_PER_NODE
        p2p = 2 * x.vp * (mb.tokens * t.hidden_size * 2 / (x.tp if x.sp else 1)) / _bw(hw, intra)
    return compute + tp_s + p2p, compute


def pipeline_slots(m: int, x: TimeInputs) -> float:
    if x.pp == 1:
        return float(m)
    if x.schedule == "interleaved":
        return m + (x.pp - 1) / x.vp
    return float(m + x.pp - 1)


def data_parallel_seconds(x: TimeInputs, hw: Hardware, last_backward_s: float, first_forward_s: float) -> float:
    if x.dp == 1:
        return 0.0
    bw = _bw(hw, x.tp * x.dp <= GPUS_PER_NODE)
    grads = x.trainable_numel * 4
    if x.distributed:
        reduce_s = _ring_s(grads, x.dp, bw, all_reduce=False)
        gather_s = _ring_s(x.trainable_numel * 2, x.dp, bw, all_reduce=False)
    else:
        reduce_s, gather_s = _ring_s(grads, x.dp, bw, all_reduce=True), 0.0
    overlapped = last_backward_s if x.vp == 1 else 0.0
    exposed = max(0.0, reduce_s - overlapped)
    exposed += max(0.0, gather_s - first_forward_s) if x.overlap_param_gather else gather_s
    return exposed


def optimizer_seconds(x: TimeInputs, hw: Hardware) -> float:
    owned = x.trainable_numel / (x.dp if x.distributed else 1)
    return (owned * 16 * 2 + x.trainable_numel * 2) / (hw.spec.hbm_tb_s * 1e12)


def training_step_seconds(config, mb: MicroBatch, hw: Hardware, x: TimeInputs, microbatches_per_rank: int) -> float:
    t_mb, compute = microbatch_seconds(config, mb, hw, x)
    pipeline = pipeline_slots(microbatches_per_rank, x) * t_mb
    return pipeline + data_parallel_seconds(x, hw, compute * 2 / 3, compute / 3) + optimizer_seconds(x, hw)


def rollout_seconds(config, hw: Hardware, x: TimeInputs, *, rows: int, rows_per_pass: int, generations: int,
                    prompt_len: int, new_tokens: int, kv_bytes_per_token_row: float) -> float:
    """Generation of `rows` sequences on one DP rank: prefill (once per prompt, shared by its G rows) +
    decode, pass by pass."""
    t = config.text_config
    passes = math.ceil(rows / max(rows_per_pass, 1))
    peak = hw.spec.bf16_tflops * 1e12 * MFU_ASSUMED[hw.card]
    per_token_flops = forward_flops(config, [1])["llm"]  # 2 FLOPs per multiply-add of every weight
    total = 0.0
    for p in range(passes):
        r = min(rows_per_pass, rows - p * rows_per_pass)
        prefill = r / generations * prompt_len * per_token_flops / (x.tp * peak)  # stages run one after the other
        context = prompt_len + new_tokens / 2
        read = x.rank_param_bytes + r * context * kv_bytes_per_token_row
        hbm = hw.spec.hbm_tb_s * 1e12 * DECODE_HBM_EFFICIENCY
        step = x.pp * read / hbm + t.num_hidden_layers * LAUNCH_S_PER_LAYER
        total += prefill + new_tokens * step
    return total
