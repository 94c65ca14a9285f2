"""Fused linear + cross-entropy: the LM-head loss without ever holding the [N, V] logits.

`fused_linear_cross_entropy(hidden [N, H], weight [V_local, H], labels [N])` computes, per row,
`loss_i = lse_i - (1 - eps) * x_i[label_i] - eps / V * sum_j x_ij + z * lse_i**2` with
`x_i = hidden_i @ weight.T`, `lse_i = logsumexp_j x_ij` (eps = label smoothing as torch defines it,
z = the PaLM z-loss weight), and 0 for ignored rows.

Design (after Apple's Cut Cross-Entropy and Liger's FLCE; no code taken from either):
- Forward: one Triton kernel per (row block, vocabulary split) sweeps its vocabulary tiles, builds each
  logits tile with `tl.dot` over H chunks, and keeps an online max / sum-exp in fp32 plus the target
  logit (and the row sum of logits for smoothing). Partial log-sum-exps of the splits are merged in
  torch ([splits, N] floats): more programs than row blocks alone, no atomics, deterministic.
- Backward recomputes each logits tile (nothing of size N*V is saved), forms
  `dlogits = (p * (1 + 2 z lse) - (1 - eps) onehot - eps / V) * g_row` and adds `dlogits @ W_tile` into
  grad_hidden and `dlogits^T @ hidden_tile` into grad_weight with fp32 atomics. Tiles whose dlogits
  are all zero (ignored rows, zero upstream gradient, underflowed softmax) are skipped exactly;
  `grad_filter_eps > 0` also skips tiles with max |dlogits| <= eps (CCE's gradient filtering: an
  approximation, off by default).
- The plain-PyTorch reference does the same maths in row chunks (at most ~16 MB of fp32 logits at a
  time) and is the CPU path. `use_triton` picks the path once per call.
- Vocab-parallel (`tp_group`): `weight` is this rank's contiguous shard, rows
  [rank * V_local, (rank + 1) * V_local) of the full head, as Megatron-Core's ColumnParallelLinear /
  VocabParallelEmbedding shard it; labels are global ids. Ranks all-reduce the per-row max of their
  log-sum-exps (MAX) and then the rescaled sum-exp, target logit and logit sum (one SUM): no rank ever
  sees other ranks' logits. Backward uses the global lse; grad_weight stays local (this rank's shard).
  Because this function takes the weight directly instead of going through ColumnParallelLinear,
  it does the all-reduce (SUM over `tp_group`) of grad_hidden itself — what ColumnParallelLinear's
  `copy_to_tensor_model_parallel_region` would do in backward. Callers must pass the replicated
  (not sequence-parallel) hidden states and must NOT wrap them in that region again.
Loss is returned in fp32 (a scalar, or [N] for reduction="none"); "mean" divides by the number of
non-ignored labels (all ignored: 0 with zero gradients). Temperature: divide `hidden` by T first.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from lingshu_fast.kernels._aot import AotSpec
from lingshu_fast.kernels._dispatch import interpreting, use_triton

_REF_CHUNK_ELEMS = 1 << 22  # fp32 logits elements per reference chunk (16 MB)
_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class FlceOptions:
    ignore_index: int = -100
    z_loss_weight: float = 0.0
    label_smoothing: float = 0.0
    grad_filter_eps: float = 0.0
    tp_group: Any = None
    triton: bool = False


@dataclass(frozen=True)
class BlockConfig:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


# Production tiles per (operand kind, arch) (checked by the AOT compile test at H=3584): every tl.dot
# dimension >= 16, shared memory within the card's limit, no register spills. Hopper (wgmma keeps the
# accumulator in fewer registers) takes BLOCK_H=64 for 16-bit inputs; Ampere and fp32 use less.
_FWD_CONFIGS = {("16bit", 90): BlockConfig(128, 128, 64, 8, 3), ("16bit", 80): BlockConfig(128, 128, 32, 8, 3),
                ("tf32", 90): BlockConfig(128, 128, 32, 8, 3), ("tf32", 80): BlockConfig(128, 128, 16, 8, 4),
                ("ieee", 90): BlockConfig(64, 128, 16, 8, 3), ("ieee", 80): BlockConfig(64, 128, 16, 8, 3)}
_BWD_CONFIGS = {("16bit", 90): BlockConfig(64, 128, 64, 8, 2), ("16bit", 80): BlockConfig(64, 128, 32, 8, 2),
                ("tf32", 90): BlockConfig(64, 128, 32, 8, 2), ("tf32", 80): BlockConfig(64, 128, 32, 8, 2),
                ("ieee", 90): BlockConfig(64, 128, 16, 8, 2), ("ieee", 80): BlockConfig(64, 128, 16, 8, 2)}
# Under TRITON_INTERPRET small tiles make the tests' tiny shapes span several ragged tiles.
_INTERPRET_CONFIG = BlockConfig(16, 32, 16, 4, 1)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST works around triton 3.9's interpreter, which multiplies bf16 tensors as their raw uint16
    # bits: it feeds the same bf16-rounded values to the dot as fp32 (exact products, fp32 sums, as
    # the GPU's bf16 MMA does). Compiled kernels never set it.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The [BLOCK_N, BLOCK_V] fp32 logits tile hidden[rows] @ weight[cols].T, masked rows/cols as 0;
    the forward's online LSE and the backward's recompute share it (inlined by the compiler)."""
    x = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :],
                    mask=row_ok[:, None] & (ks[None, :] < H), other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None],
                      mask=col_ok[None, :] & (ks[:, None] < H), other=0.0)
        x = _dot(h, w_t, x, DOT_PRECISION, UPCAST)
    return x


@triton.jit
def _flce_fwd_kernel(h_ptr, w_ptr, labels_ptr, lse_part_ptr, tgt_part_ptr, sumx_part_ptr,
                     N, H, V, vocab_start, tiles_per_split, stride_hn, stride_wv,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     WITH_SUMX: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    local_label = tl.load(labels_ptr + rows, mask=row_ok, other=0) - vocab_start
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    tgt = tl.zeros([BLOCK_N], tl.float32)
    sumx = tl.zeros([BLOCK_N], tl.float32)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)  # host makes every split non-empty
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        x = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                         BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST)
        x = tl.where(col_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))  # finite: each tile has a valid column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        m = m_new
        # col_ok matters: under TP a label of the next shard matches a padded column of this one.
        tgt += tl.sum(tl.where(col_ok[None, :] & (cols[None, :] == local_label[:, None]), x, 0.0), 1)
        if WITH_SUMX:
            sumx += tl.sum(tl.where(col_ok[None, :], x, 0.0), 1)
    out = pid_s * N + rows
    tl.store(lse_part_ptr + out, m + tl.log(s), mask=row_ok)
    tl.store(tgt_part_ptr + out, tgt, mask=row_ok)
    if WITH_SUMX:
        tl.store(sumx_part_ptr + out, sumx, mask=row_ok)


@triton.jit
def _flce_bwd_kernel(h_ptr, w_ptr, labels_ptr, lse_ptr, g_ptr, gh_ptr, gw_ptr,
                     N, H, V, vocab_start, target_coef, smooth_per_class, z2, filter_eps,
                     stride_hn, stride_wv, stride_ghn, stride_gwv,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Vocabulary blocks vary fastest so neighbouring programs share the same hidden rows in L2.
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # 0 on ignored rows
    if tl.max(tl.abs(g), 0) > 0:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        local_label = tl.load(labels_ptr + rows, mask=row_ok, other=0) - vocab_start
        x = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                         BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST)
        p = tl.where(col_ok[None, :], tl.exp(x - lse[:, None]), 0.0)
        d = p * (1.0 + z2 * lse)[:, None]
        d -= tl.where(col_ok[None, :] & (cols[None, :] == local_label[:, None]), target_coef, 0.0)
        d -= tl.where(col_ok[None, :], smooth_per_class, 0.0)
        d = d * g[:, None]
        if tl.max(tl.max(tl.abs(d), 1), 0) > filter_eps:
            d_in = d.to(h_ptr.dtype.element_ty)
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                k_ok = ks < H
                w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :],
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                gh = _dot(d_in, w, tl.zeros([BLOCK_N, BLOCK_H], tl.float32), DOT_PRECISION, UPCAST)
                tl.atomic_add(gh_ptr + rows[:, None] * stride_ghn + ks[None, :], gh,
                              mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
                h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                gw = _dot(tl.trans(d_in), h, tl.zeros([BLOCK_V, BLOCK_H], tl.float32), DOT_PRECISION, UPCAST)
                tl.atomic_add(gw_ptr + cols[:, None] * stride_gwv + ks[None, :], gw,
                              mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting; 16-bit inputs always use tensor cores.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast_dots(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreting()


def _config(table: dict, dtype: torch.dtype, device: torch.device) -> BlockConfig:
    if device.type != "cuda":
        return _INTERPRET_CONFIG
    arch = 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80
    return table[(_config_key(dtype, _dot_precision(dtype)), arch)]


def _config_key(dtype: torch.dtype, precision: str) -> str:
    return precision if dtype == torch.float32 else "16bit"


def _num_v_splits(n_row_blocks: int, n_v_tiles: int, device: torch.device) -> int:
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2  # the interpreter: exercise the split merge without slowing tests
    return max(1, min(n_v_tiles, -(-target // n_row_blocks)))


def _triton_forward(hidden, weight, labels, vocab_start: int, with_sumx: bool):
    n_rows, h_dim = hidden.shape
    v_local = weight.shape[0]
    cfg = _config(_FWD_CONFIGS, hidden.dtype, hidden.device)
    n_row_blocks = triton.cdiv(n_rows, cfg.block_n)
    n_v_tiles = triton.cdiv(v_local, cfg.block_v)
    tiles_per_split = triton.cdiv(n_v_tiles, _num_v_splits(n_row_blocks, n_v_tiles, hidden.device))
    splits = triton.cdiv(n_v_tiles, tiles_per_split)  # every split owns >= 1 valid tile
    parts = torch.empty(3 if with_sumx else 2, splits, n_rows, device=hidden.device, dtype=torch.float32)
    sumx_buf = parts[2] if with_sumx else parts[1]
    _flce_fwd_kernel[(n_row_blocks, splits)](
        hidden, weight, labels, parts[0], parts[1], sumx_buf,
        n_rows, h_dim, v_local, vocab_start, tiles_per_split, hidden.stride(0), weight.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, WITH_SUMX=with_sumx,
        DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST=_upcast_dots(hidden.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    lse = torch.logsumexp(parts[0], dim=0)
    return lse, parts[1].sum(0), (parts[2].sum(0) if with_sumx else None)


def _triton_backward(hidden, weight, labels, vocab_start, lse, g, coefs, filter_eps: float):
    n_rows, h_dim = hidden.shape
    v_local = weight.shape[0]
    cfg = _config(_BWD_CONFIGS, hidden.dtype, hidden.device)
    grad_h = torch.zeros(n_rows, h_dim, device=hidden.device, dtype=torch.float32)
    grad_w = torch.zeros(v_local, h_dim, device=hidden.device, dtype=torch.float32)
    grid = (triton.cdiv(v_local, cfg.block_v), triton.cdiv(n_rows, cfg.block_n))
    _flce_bwd_kernel[grid](
        hidden, weight, labels, lse, g, grad_h, grad_w,
        n_rows, h_dim, v_local, vocab_start, *coefs, filter_eps,
        hidden.stride(0), weight.stride(0), grad_h.stride(0), grad_w.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST=_upcast_dots(hidden.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return grad_h, grad_w


def _row_chunks(n_rows: int, v_local: int):
    step = max(1, _REF_CHUNK_ELEMS // max(v_local, 1))
    return [(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _torch_forward(hidden, weight, labels, vocab_start: int, with_sumx: bool):
    """Reference forward: per-row local lse, target logit and logit sum, chunked over rows in fp32."""
    n_rows, v_local = hidden.shape[0], weight.shape[0]
    w32 = weight.float()
    lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    tgt = torch.zeros_like(lse)
    sumx = torch.zeros_like(lse) if with_sumx else None
    local = labels - vocab_start
    in_shard = (local >= 0) & (local < v_local)
    for a, b in _row_chunks(n_rows, v_local):
        x = hidden[a:b].float() @ w32.T
        idx = local[a:b].clamp(0, v_local - 1).unsqueeze(1)
        tgt[a:b] = torch.where(in_shard[a:b], x.gather(1, idx).squeeze(1), 0.0)
        if with_sumx:
            sumx[a:b] = x.sum(1)
        row_max = x.amax(1)
        lse[a:b] = row_max + x.sub_(row_max[:, None]).exp_().sum(1).log_()  # in place: no second buffer
    return lse, tgt, sumx


def _torch_backward(hidden, weight, labels, vocab_start, lse, g, coefs, filter_eps: float):
    """Reference backward: recompute each chunk's logits, form dlogits in place, two matmuls."""
    target_coef, smooth_per_class, z2 = coefs
    n_rows, v_local = hidden.shape[0], weight.shape[0]
    w32 = weight.float()
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_w = torch.zeros(w32.shape, dtype=torch.float32, device=hidden.device)
    local = labels - vocab_start
    in_shard = (local >= 0) & (local < v_local)
    for a, b in _row_chunks(n_rows, v_local):
        g_c = g[a:b]
        if not bool(g_c.any()):
            continue  # all rows ignored or zero upstream gradient: nothing to add (exact)
        h32 = hidden[a:b].float()
        # dlogits = p * g (1 + 2 z lse) - g (1 - eps) onehot - g eps / V, built in place on the logits.
        d = torch.matmul(h32, w32.T)
        d.sub_(lse[a:b, None]).exp_().mul_((g_c * (1.0 + z2 * lse[a:b]))[:, None])
        if smooth_per_class:
            d.sub_((g_c * smooth_per_class)[:, None])
        rows = torch.nonzero(in_shard[a:b]).squeeze(1)
        d[rows, local[a:b][rows]] -= target_coef * g_c[rows]
        if filter_eps > 0:
            d.masked_fill_(d.abs() <= filter_eps, 0.0)
        grad_h[a:b] = d @ w32
        grad_w.addmm_(d.T, h32)
    return grad_h, grad_w


def _tp_merge(lse, tgt, sumx, group):
    """Global lse / target / logit sum from each rank's shard: a MAX then one SUM all-reduce."""
    lse_max = lse.clone()
    dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
    parts = [torch.exp(lse - lse_max), tgt] + ([sumx] if sumx is not None else [])
    stacked = torch.stack(parts)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    return lse_max + torch.log(stacked[0]), stacked[1], (stacked[2] if sumx is not None else None)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Per-row losses [N] (fp32); the reduction happens outside, so any upstream grad is honoured."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, opts: FlceOptions):
        group = opts.tp_group
        rank = dist.get_rank(group) if group is not None else 0
        world = dist.get_world_size(group) if group is not None else 1
        v_local = weight.shape[0]
        vocab_start, v_global = rank * v_local, world * v_local
        valid = labels != opts.ignore_index
        bad = valid & ((labels < 0) | (labels >= v_global))
        if bool(bad.any()):
            raise ValueError(f"fused_linear_cross_entropy: label {int(labels[bad][0])} is outside the vocabulary "
                             f"[0, {v_global}) and is not ignore_index={opts.ignore_index}")
        hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
        smoothing = opts.label_smoothing > 0
        fwd = _triton_forward if opts.triton else _torch_forward
        lse, tgt, sumx = fwd(hidden, weight, labels, vocab_start, smoothing)
        if group is not None and world > 1:
            lse, tgt, sumx = _tp_merge(lse, tgt, sumx, group)
        loss = lse - (1.0 - opts.label_smoothing) * tgt + opts.z_loss_weight * lse * lse
        if smoothing:
            loss = loss - (opts.label_smoothing / v_global) * sumx
        loss = torch.where(valid, loss, 0.0)
        ctx.save_for_backward(hidden, weight, labels, lse, valid)
        ctx.opts, ctx.vocab_start, ctx.v_global, ctx.world = opts, vocab_start, v_global, world
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        hidden, weight, labels, lse, valid = ctx.saved_tensors
        opts = ctx.opts
        g = torch.where(valid, grad_rows.float(), 0.0).contiguous()
        coefs = (1.0 - opts.label_smoothing, opts.label_smoothing / ctx.v_global, 2.0 * opts.z_loss_weight)
        bwd = _triton_backward if opts.triton else _torch_backward
        grad_h, grad_w = bwd(hidden, weight, labels, ctx.vocab_start, lse, g, coefs, opts.grad_filter_eps)
        if opts.tp_group is not None and ctx.world > 1:
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=opts.tp_group)  # ColumnParallelLinear's job
        grad_h = grad_h.to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100, reduction: str = "mean", tp_group=None,
                               z_loss_weight: float = 0.0, label_smoothing: float = 0.0,
                               grad_filter_eps: float = 0.0) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels` without materialising the logits.

    hidden [N, H], weight [V_local, H] (same dtype), labels [N] long (global ids; `ignore_index` rows
    count for nothing). Returns an fp32 scalar ("mean": over non-ignored rows, 0 if none; "sum") or
    the per-row losses [N] ("none", 0 on ignored rows; differentiable for any upstream gradient).
    `tp_group`: vocab-parallel, see the module docstring (grad_hidden is all-reduced here).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(_REDUCTIONS)}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] must share H; got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N]={hidden.shape[0]}; got {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    opts = FlceOptions(ignore_index=ignore_index, z_loss_weight=z_loss_weight, label_smoothing=label_smoothing,
                       grad_filter_eps=grad_filter_eps, tp_group=tp_group,
                       triton=use_triton(hidden, weight, labels))
    loss_rows = _FusedLinearCrossEntropy.apply(hidden, weight, labels.long(), opts)
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    n_valid = (labels != ignore_index).sum().clamp(min=1)
    return loss_rows.sum() / n_valid


_H_7B = 3584
_V_7B = 151936  # Qwen2.5 vocabulary; V/tp for tp in 1, 2, 4, 8 stays a multiple of 16
# (element type, dot precision): bf16 training, fp32 with allow_tf32, fp32 without it (torch's default).
_AOT_VARIANTS = (("bf16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee"))
_INT_ARGS = {n: "i32" for n in ("N", "H", "V", "vocab_start")}


def aot_specs() -> list[AotSpec]:
    """The launches of the 7B head (H=3584, V_local=151936/tp, any N): per element type, dot precision,
    target arch and kernel. Only the tensor-core variants are expected to use wgmma on sm_90a."""
    specs = []
    for (ty, prec), arch in itertools.product(_AOT_VARIANTS, (80, 90)):
        key = _config_key(torch.float32 if ty == "fp32" else torch.bfloat16, prec)
        for with_sumx in (False, True):
            cfg = _FWD_CONFIGS[(key, arch)]
            sig = {"h_ptr": f"*{ty}", "w_ptr": f"*{ty}", "labels_ptr": "*i64", "lse_part_ptr": "*fp32",
                   "tgt_part_ptr": "*fp32", "sumx_part_ptr": "*fp32", **_INT_ARGS, "tiles_per_split": "i32",
                   "stride_hn": "i32", "stride_wv": "i32"}
            consts = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                          WITH_SUMX=with_sumx, DOT_PRECISION=prec, UPCAST=False)
            specs.append(_spec(f"flce_fwd[{ty},{prec},sumx={with_sumx}]", _flce_fwd_kernel, sig, consts, cfg, arch,
                               prec, ("H", "V", "stride_hn", "stride_wv")))
        cfg = _BWD_CONFIGS[(key, arch)]
        sig = {"h_ptr": f"*{ty}", "w_ptr": f"*{ty}", "labels_ptr": "*i64", "lse_ptr": "*fp32", "g_ptr": "*fp32",
               "gh_ptr": "*fp32", "gw_ptr": "*fp32", **_INT_ARGS, "target_coef": "fp32",
               "smooth_per_class": "fp32", "z2": "fp32", "filter_eps": "fp32", "stride_hn": "i32",
               "stride_wv": "i32", "stride_ghn": "i32", "stride_gwv": "i32"}
        consts = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, DOT_PRECISION=prec,
                      UPCAST=False)
        specs.append(_spec(f"flce_bwd[{ty},{prec}]", _flce_bwd_kernel, sig, consts, cfg, arch, prec,
                           ("H", "V", "stride_hn", "stride_wv", "stride_ghn", "stride_gwv")))
    return specs


def _spec(name, fn, sig, consts, cfg: BlockConfig, arch: int, prec: str, aligned) -> AotSpec:
    return AotSpec(f"{name[:-1]},H={_H_7B},V={_V_7B}/tp,sm{arch}]", fn, {**sig, **{k: "constexpr" for k in consts}},
                   consts, cfg.num_warps, cfg.num_stages, expects_wgmma=prec != "ieee", aligned_args=aligned,
                   capabilities=(arch,))
