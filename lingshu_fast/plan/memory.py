"""Per-rank peak memory of one layout: parameters, main gradients, optimizer state, activations, the
fused-CE workspace, pipeline buffers, stage-4 rollout buffers, and a reserve. A MODEL (see hardware.py).

Parameters, gradients and optimizer state follow this trainer's accounting exactly (train/memory.py's
`memory_report`; tests/test_plan_activations.py checks the counts): every parameter in its dtype (bf16
on CUDA: 2 bytes; frozen ones cost only that), an fp32 main gradient per trainable parameter (4 bytes,
`optim.grad_accumulation_dtype=param`: the parameter's), fp32 masters (when parameters are not fp32)
and Adam's m and v: 12 bytes, a 1/DP share of them under the distributed optimizer (`optim.distributed`,
default on when DP > 1). So 2 + 4 + 12/DP bytes per trainable bf16 parameter; the gradient buffers'
padding (under DP elements per bucket) is left out. Stage 4 adds the frozen reference model (rl.beta != 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from lingshu_fast.config import ROLLOUT_FREE_FRACTION, Config
from lingshu_fast.kernels import _flce_triton as flce
from lingshu_fast.plan.activations import BACKENDS, RankPieces, Split, Widths, rank_activation_peak
from lingshu_fast.plan.hardware import FRAGMENTATION, RESERVE_FIXED_GB

GIB = 2 ** 30


def _linear(out_f: int, in_f: int, bias: bool, kind: str, tp: int) -> int:
    """Elements of one linear layer on a TP rank (column: rows and bias split; row: columns split,
    bias whole), as Megatron-Core's layers hold them."""
    if kind == "column":
        return out_f // tp * in_f + (out_f // tp if bias else 0)
    if kind == "row":
        return out_f * (in_f // tp) + (out_f if bias else 0)
    return out_f * in_f + (out_f if bias else 0)


def rank_param_numel(hf_config, split: Split, pieces: RankPieces) -> dict[str, int]:
    """Parameter elements per module group (vision, merger, llm) on one rank, exactly as the model
    (qwen2_5_vl.py, vision.py, language.py) allocates them."""
    t, v = hf_config.text_config, hf_config.vision_config
    w = Widths.of(hf_config)
    tp, vt = split.tp, split.vit_tp
    counts = {"vision": 0, "merger": 0, "llm": 0}
    if pieces.first:
        d, iv = v.hidden_size, v.intermediate_size
        kind = "column" if vt > 1 else "whole"
        row = "row" if vt > 1 else "whole"
        block = 2 * d + _linear(3 * d, d, True, kind, vt) + _linear(d, d, True, row, vt) \
            + _linear(2 * iv, d, True, kind, vt) + _linear(d, iv, True, row, vt)
        counts["vision"] = w.patch_values * d + v.depth * block
        m = d * v.spatial_merge_size ** 2
        counts["merger"] = d + _linear(m, m, True, kind, vt) + _linear(v.out_hidden_size, m, True, row, vt)
        counts["llm"] += t.vocab_size // tp * t.hidden_size
    h = t.hidden_size
    layer = 2 * h + _linear(w.q + 2 * w.kv, h, True, "column", tp) + _linear(h, w.q, False, "row", tp) \
        + _linear(2 * t.intermediate_size, h, False, "column", tp) + _linear(h, t.intermediate_size, False, "row", tp)
    counts["llm"] += layer * len(pieces.layer_ids)
    if pieces.last:
        borrowed = bool(hf_config.tie_word_embeddings) and pieces.first
        counts["llm"] += h + (0 if borrowed else t.vocab_size // tp * h)
    return counts


@dataclass
class StateBytes:
    params: float
    grads: float
    optimizer: float
    trainable_numel: int


def state_bytes(numel: dict[str, int], cfg: Config, *, dp: int, param_bytes: int, with_reference: bool) -> StateBytes:
    """Parameters, main gradients and optimizer state of one rank (the module doc's accounting)."""
    frozen = set(cfg.model.freeze)
    trainable = sum(n for g, n in numel.items() if g not in frozen)
    total = sum(numel.values())
    distributed = cfg.optim.distributed if cfg.optim.distributed is not None else dp > 1
    grad_bytes = 4 if cfg.optim.grad_accumulation_dtype == "fp32" else param_bytes
    master = 0 if param_bytes == 4 else 4
    optim_per = (master + 8) / (dp if distributed and dp > 1 else 1)
    params = total * param_bytes * (2 if with_reference else 1)
    return StateBytes(params, trainable * grad_bytes, trainable * optim_per, trainable)


def flce_workspace_bytes(w: Widths, tokens: int, split: Split, backend: str, head_trainable: bool,
                         scalar_loss: bool = False, main_grad_bytes: int = 0) -> float:
    """The fused linear cross-entropy's buffers during its backward (kernels/fused_linear_cross_entropy.py):
    Triton path: the dlogits stripe D [N, S] (<= STRIPE_BYTES), fp32 grad_hidden and its cast, and the
    head's weight gradient in the weight's dtype; with a scalar loss (`scalar_loss`: stages 1-3) and no
    vocabulary split, the 3-pass path instead: the [rows, V] stripe and its fp32 partials, grad_hidden
    and grad_weight in the inputs' dtype (formed in forward, held until backward); reference path: fp32
    grad_weight, grad_hidden and one row chunk of logits. `main_grad_bytes` > 0 (the trainer: its grad
    buffers give the head a main gradient of that element size): the weight's gradient is added into it
    (gradient-accumulation fusion), so no grad_weight is held (the reference keeps an fp32 one only for a
    16-bit main gradient) and the 3-pass stripe is sized for that main gradient's read-add-write."""
    v_local = w.vocab // split.tp
    fused_head = head_trainable and main_grad_bytes > 0
    if backend == "fused":
        cfg = flce.BWD_CONFIGS[("16bit", 90)]
        n_tiles = -(-v_local // cfg.block_v)
        head_grad = v_local * w.hidden * 2 if head_trainable and not fused_head else 0
        if scalar_loss and split.tp == 1:
            rows = flce.plan_row_stripe(tokens, cfg.block_n, 90, max(1, main_grad_bytes // 2) if fused_head else 1)
            return rows * v_local * 2 + 4 * n_tiles * rows * 4 + tokens * w.hidden * 2 + head_grad
        stripe = flce.plan_stripe_tiles(tokens, n_tiles, cfg.block_v, 2, flce.STRIPE_BYTES)
        return tokens * stripe * cfg.block_v * 2 + tokens * w.hidden * (4 + 2) + head_grad
    chunk_rows = max(1, (1 << 22) // max(v_local, 1))
    head_grad = v_local * w.hidden * 4 if head_trainable and (not fused_head or main_grad_bytes != 4) else 0
    return tokens * w.hidden * 4 + min(tokens, chunk_rows) * v_local * 4 + head_grad


def rollout_bytes(w: Widths, cfg: Config, *, layers: int, split: Split, dp: int, backend: str) -> tuple[float, float]:
    """(bytes of one pass over every prompt x G row at full capacity, bytes per row): the KV cache of
    this rank's layers for data.max_length tokens (prompt + rl.max_new_tokens) and one decode step's
    logits (gathered over TP in the model dtype, then fp32 and its log-softmax)."""
    b = BACKENDS[backend]
    kv_row = cfg.data.max_length * layers * 2 * (w.kv // split.tp) * b
    per_row = kv_row + w.vocab * (b + 4 + 4)
    rows = math.ceil(cfg.rl.rollout_batch / dp) * cfg.rl.num_generations
    return rows * per_row, per_row


@dataclass
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    activations: float
    workspace: float  # fused-CE buffers at the peak
    pipeline: float  # the schedule's static send/receive buffers
    rollout: float  # stage 4: KV cache + logits of one generation pass (capped by the budget)
    reserve: float
    fits_rollout: bool = True
    detail: dict = field(default_factory=dict)

    @property
    def training_peak(self) -> float:
        return self.activations + self.workspace + self.pipeline

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + max(self.training_peak, self.rollout) + self.reserve

    @property
    def other(self) -> float:
        return self.total - self.params - self.grads - self.optimizer - self.activations

    def gb(self) -> dict[str, float]:
        keys = ("params", "grads", "optimizer", "activations", "other", "total")
        return {k: round(getattr(self, k) / GIB, 2) for k in keys}


def reserve_bytes(tensor_bytes: float) -> float:
    return RESERVE_FIXED_GB * GIB + FRAGMENTATION * tensor_bytes


def rollout_budget_bytes(cfg: Config, device_bytes: float, static_bytes: float) -> float:
    """rl.rollout_memory_gb, or its default: a share of what the training state leaves free."""
    if cfg.rl.rollout_memory_gb is not None:
        return cfg.rl.rollout_memory_gb * GIB
    return max(0.0, ROLLOUT_FREE_FRACTION * (device_bytes - static_bytes - RESERVE_FIXED_GB * GIB))


def activation_terms(w: Widths, tokens: int, patches: int, pieces: RankPieces, cfg: Config, *, policy: str,
                     backend: str, split: Split, vit_depth: int, in_flight: float) -> tuple[float, float]:
    head_trainable = "llm" not in cfg.model.freeze
    scalar_loss = cfg.train.stage != 4  # the GRPO loss sends per-token gradients (the 4-pass path)
    main_grad_bytes = 4 if cfg.optim.grad_accumulation_dtype == "fp32" else BACKENDS[backend]  # grad buffers
    workspace = (flce_workspace_bytes(w, tokens, split, backend, head_trainable, scalar_loss, main_grad_bytes)
                 if pieces.last else 0.0)
    embed_grad = w.vocab // split.tp * w.hidden * BACKENDS[backend] if head_trainable else 0.0
    return rank_activation_peak(w, tokens, patches, pieces, policy=policy, every_k=cfg.model.checkpoint_every_k_layers,
                                backend=backend, split=split, vit_depth=vit_depth, head_workspace=workspace,
                                embed_grad=embed_grad, in_flight=in_flight)
