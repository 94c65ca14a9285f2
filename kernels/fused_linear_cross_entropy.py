"""Fused linear + cross-entropy: the LM-head loss without ever holding the [N, V] logits.

`fused_linear_cross_entropy(hidden [N, H], weight [V_local, H], labels [N])` computes, per row,
`loss_i = lse_i - (1 - eps) * x_i[label_i] - eps / V * sum_j x_ij + z * lse_i**2` with
`x_i = hidden_i @ weight.T`, `lse_i = logsumexp_j x_ij` (eps = label smoothing as torch defines it,
z = the PaLM z-loss weight), and 0 for ignored rows.

Design (after Apple's Cut Cross-Entropy and Liger's FLCE; no code taken from either). The Triton
kernels live in `_flce_triton.py`, their launch code in `_flce_launch.py`; `bench/roofline.py` models
them (a model, not a measurement).
- Forward: one program per (row block, vocabulary split), splits varying fastest in a 1-D grid, so the
  programs of one wave share a few row blocks whose hidden states stay in L2 while each split streams
  its weight tiles (read once per wave). Each program keeps an online max / sum-exp in fp32 plus the
  target logit (and the row sum of logits for smoothing); the splits' partials are merged in torch.
  The split count (`plan_splits`) keeps a wave's hidden states within a quarter of L2 and fills the
  last wave of SMs as far as it can.
- Backward, vocabulary STRIPE by stripe (S columns, a D [N, S] buffer of ~64 MB on GPU): kernel 1
  recomputes each logits tile of the stripe (grouped super-tiles of 8 row blocks), forms
  `dlogits = g (p (1 + 2 z lse) - (1 - eps) onehot - eps / V)` and stores it; kernel 2 writes the
  stripe's grad_weight = D^T @ hidden once, accumulated in fp32 registers over all N rows and stored in
  the weight's dtype (no fp32 [V, H] buffer, no cast copy); kernel 3 adds D @ weight[stripe] into an
  fp32 grad_hidden, each program owning its output tile. No atomics anywhere: every sum runs in a fixed
  order inside one program, so the gradients are bit-stable run to run (there is no separate
  deterministic mode because there is no non-deterministic one).
  Why this scheme (roofline model at N=16,384, H=3,584, V=152,064, bf16, H100): the previous fused
  backward (fp32 atomics per row block into [V, H], vocabulary-fastest grid) was put at ~540 ms by an
  earlier traffic model; with larger row tiles and grouping (option A) the fp32 atomics of dW and dE
  still move ~1.1 TB through L2 (L2-bound, ~100 ms) and need the fp32 dW buffer; a split into a dE kernel looping over the
  vocabulary and a dW kernel looping over rows without a stored D (option B) cannot hold a [rows, H]
  accumulator for H=3,584 on chip, so it recomputes the logits once per H tile (28x). The stripes
  keep all four GEMMs (forward, recompute, dW, dE) on tensor cores at ~72 ms modelled, compute-bound.
  The price: the D stripe and the fp32 grad_hidden (~0.3 GB extra at this shape), and one read-add-
  write of grad_hidden per stripe, which gradient filtering cannot skip. No design without stored
  logits does fewer than these four GEMMs; Liger does three by keeping [512, V] logits chunks.
- 3-pass path (a scalar loss, the SFT path): when reduction is 'sum' or 'mean' and a gradient is wanted,
  the gradients are computed IN FORWARD, row stripe by row stripe (`plan_row_stripe` rows, all of V,
  an X [rows, V] buffer of ~195 MB at the 7B head on H100, ~390 MB when adding into an fp32 main_grad): the logits kernel stores exp(x - tile
  max) (in [0, 1], so bf16 keeps each probability to 2**-9 relative; raw bf16 logits would not) and
  fp32 partials (GEMM 1), torch merges the lse, a kernel turns X into g * dlogits in place
  (same formula and filter as kernel 1 above), then the dW kernel adds X^T @ hidden into grad_weight
  (GEMM 2, fp32 sums added to W's dtype once per stripe) and the dE kernel writes the stripe's rows of
  grad_hidden (GEMM 3, complete in one stripe, stored in hidden's dtype). Backward only multiplies both
  by the scalar upstream gradient, in place. Three GEMMs instead of four, as Liger, without [N, V]:
  ~62 ms modelled at the shape above (bench/roofline.py; Liger ~63, the 4-pass path ~72).
  Why 3-pass only for a scalar loss (`grads_in_forward` decides, nowhere else): the gradients must be
  formed before the upstream gradient is known, which is possible only when it is one number for all
  rows; reduction='none' (GRPO: per-token upstream gradients) keeps the 4-pass path. Vocab-parallel
  heads keep it too (the lse of a stripe would need an all-reduce inside the forward's stripe loop).
  Costs: grad_weight is rounded to W's dtype once per row stripe (26 times at the 7B head on H100; Liger
  rounds its bf16 addmm accumulator once per chunk), work is wasted if the loss is never backwarded, and
  a second backward (retain_graph) through the scalar is refused.
- Gradient filtering (`filter_eps` > 0, off by default; CCE's rule): a dlogits tile is skipped (not
  stored, and left out of kernels 2 and 3) when every entry of its rows that have a gradient is below
  eps in magnitude before the upstream scale g. Tiles whose rows all have g = 0 (ignored rows) are
  skipped exactly. The reference applies the same rule on the same tile grid.
- Frozen head (weight.requires_grad False): no dW kernel is launched and no grad_weight is allocated
  (both paths).
- Gradient-accumulation fusion (`main_grad`, as Megatron's `gradient_accumulation_fusion`): the trainer
  keeps an fp32 main gradient per parameter (parallel/grad_buffer.py); given the head's, the dW kernel
  adds into it (read-add-write, fp32 sums) instead of writing a [V, H] grad_weight, which autograd then
  never sees (the weight's gradient is returned as None; `on_main_grad()` tells the grad buffer the
  contribution is in, for its bucket's reduction; leave it None when the weight also gets a gradient
  through autograd, as a tied embedding does). Nothing of [V, H] is allocated, and the hook's bf16 ->
  fp32 add of a separate grad_weight is gone. 4-pass: the add happens in backward. 3-pass: in forward,
  before the upstream gradient is known, so the caller promises it is exactly 1 (the trainer backwards
  loss SUMS and scales the main gradients once per step); backward checks that on the device (no
  host sync) and refuses anything else. The 3-pass stripe doubles when the add is fp32 (twice the bytes
  per stripe's read-add-write at the same arithmetic; `plan_row_stripe`). A 3-pass loss computed with
  `main_grad` MUST be backwarded: its contribution is in main_grad from the forward on.
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

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lingshu_fast.kernels._dispatch import use_triton
from lingshu_fast.kernels._flce_aot import flce_aot_specs
from lingshu_fast.kernels._flce_launch import _configs, _triton_backward, _triton_forward, _triton_forward_with_grads

_REF_CHUNK_ELEMS = 1 << 22  # fp32 logits elements per reference chunk (16 MB)
_REDUCTIONS = ("mean", "sum", "none")
FILTER_EPS_BF16 = 2.0 ** -12  # CCE's threshold for bf16 inputs (bf16 eps / 32)


@dataclass(frozen=True)
class FlceOptions:
    ignore_index: int = -100
    z_loss_weight: float = 0.0
    label_smoothing: float = 0.0
    filter_eps: float = 0.0
    tp_group: Any = None
    triton: bool = False


def _row_chunks(n_rows: int, v_local: int, align: int):
    """Row chunks of ~_REF_CHUNK_ELEMS logits, each starting on a multiple of `align` (the filter's tile)."""
    step = max(align, _REF_CHUNK_ELEMS // max(v_local, 1) // align * align)
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
    for a, b in _row_chunks(n_rows, v_local, 1):
        x = hidden[a:b].float() @ w32.T
        idx = local[a:b].clamp(0, v_local - 1).unsqueeze(1)
        tgt[a:b] = torch.where(in_shard[a:b], x.gather(1, idx).squeeze(1), 0.0)
        if with_sumx:
            sumx[a:b] = x.sum(1)
        row_max = x.amax(1)
        lse[a:b] = row_max + x.sub_(row_max[:, None]).exp_().sum(1).log_()  # in place: no second buffer
    return lse, tgt, sumx


def filter_tiles_(d: torch.Tensor, tile_rows: int, tile_cols: int, eps: float) -> torch.Tensor:
    """CCE's gradient filter on an unscaled dlogits chunk whose first row and column start tiles: zero every
    tile_rows x tile_cols tile whose entries are all below eps in magnitude (in place)."""
    n, v = d.shape
    mags = F.pad(d.abs(), (0, (-v) % tile_cols, 0, (-n) % tile_rows))
    keep = mags.view(mags.shape[0] // tile_rows, tile_rows, -1, tile_cols).amax(dim=(1, 3)) >= eps
    return d.mul_(keep.repeat_interleave(tile_rows, 0).repeat_interleave(tile_cols, 1)[:n, :v])


def _torch_backward(hidden, weight, labels, vocab_start, lse, g, coefs, filter_eps: float,
                    need_dh: bool, need_dw: bool, main_grad=None):
    """Reference backward: recompute each chunk's logits, form dlogits in place (the kernel's formula and
    filter, on the tiles the Triton path would use on this device), two matmuls. Nothing of [V, H] is
    allocated unless grad_weight is wanted and there is no fp32 `main_grad` to add it into (then grad_weight
    is returned as None)."""
    target_coef, smooth_per_class, z2 = coefs
    n_rows, v_local = hidden.shape[0], weight.shape[0]
    tile = _configs(hidden.dtype, hidden.device)[1]
    w32 = weight.float()
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
    fused = need_dw and main_grad is not None
    if fused and main_grad.dtype == torch.float32:
        grad_w = main_grad  # added into chunk by chunk
    else:
        grad_w = torch.zeros(w32.shape, dtype=torch.float32, device=hidden.device) if need_dw else None
    local = labels - vocab_start
    in_shard = (local >= 0) & (local < v_local)
    for a, b in _row_chunks(n_rows, v_local, tile.block_n):
        g_c = g[a:b]
        if not bool(g_c.any()):
            continue  # all rows ignored or zero upstream gradient: nothing to add (exact)
        h32 = hidden[a:b].float()
        # dlogits / g = p (1 + 2 z lse) - (1 - eps) onehot - eps / V, built in place on the logits.
        d = torch.matmul(h32, w32.T)
        d.sub_(lse[a:b, None]).exp_().mul_((1.0 + z2 * lse[a:b])[:, None])
        if smooth_per_class:
            d.sub_(smooth_per_class)
        rows = torch.nonzero(in_shard[a:b]).squeeze(1)
        d[rows, local[a:b][rows]] -= target_coef
        d.mul_((g_c != 0)[:, None])  # rows without a gradient hold nothing, so they never keep a tile
        if filter_eps > 0:
            filter_tiles_(d, tile.block_n, tile.block_v, filter_eps)
        d.mul_(g_c[:, None])
        if need_dh:
            grad_h[a:b] = d @ w32
        if need_dw:
            grad_w.addmm_(d.T, h32)
    if fused:
        if grad_w is not main_grad:
            main_grad.add_(grad_w)
        return grad_h, None
    return grad_h, grad_w


def _torch_forward_with_grads(hidden, weight, labels, g, coefs, filter_eps: float, with_sumx: bool,
                              need_dh: bool, need_dw: bool, main_grad=None):
    """Reference of the 3-pass path: the reference forward, then the reference backward with g (the same
    maths and filter as the 4-pass path), gradients returned in the inputs' dtypes."""
    lse, tgt, sumx = _torch_forward(hidden, weight, labels, 0, with_sumx)
    grad_h, grad_w = _torch_backward(hidden, weight, labels, 0, lse, g, coefs, filter_eps, need_dh, need_dw,
                                     main_grad)
    return (lse, tgt, sumx, grad_h.to(hidden.dtype) if need_dh else None,
            grad_w.to(weight.dtype) if grad_w is not None else None)


def _tp_merge(lse, tgt, sumx, group):
    """Global lse / target / logit sum from each rank's shard: a MAX then one SUM all-reduce."""
    lse_max = lse.clone()
    dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
    parts = [torch.exp(lse - lse_max), tgt] + ([sumx] if sumx is not None else [])
    stacked = torch.stack(parts)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    return lse_max + torch.log(stacked[0]), stacked[1], (stacked[2] if sumx is not None else None)


def _valid_labels(labels: torch.Tensor, v_global: int, ignore_index: int) -> torch.Tensor:
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= v_global))
    if bool(bad.any()):
        raise ValueError(f"fused_linear_cross_entropy: label {int(labels[bad][0])} is outside the vocabulary "
                         f"[0, {v_global}) and is not ignore_index={ignore_index}")
    return valid


def _loss_rows(lse, tgt, sumx, valid, opts: FlceOptions, v_global: int) -> torch.Tensor:
    loss = lse - (1.0 - opts.label_smoothing) * tgt + opts.z_loss_weight * lse * lse
    if sumx is not None:
        loss = loss - (opts.label_smoothing / v_global) * sumx
    return torch.where(valid, loss, 0.0)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Per-row losses [N] (fp32); the reduction happens outside, so any upstream grad is honoured."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, opts: FlceOptions, sink: "_MainGradSink"):
        group = opts.tp_group
        rank = dist.get_rank(group) if group is not None else 0
        world = dist.get_world_size(group) if group is not None else 1
        v_local = weight.shape[0]
        vocab_start, v_global = rank * v_local, world * v_local
        valid = _valid_labels(labels, v_global, opts.ignore_index)
        hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
        smoothing = opts.label_smoothing > 0
        fwd = _triton_forward if opts.triton else _torch_forward
        lse, tgt, sumx = fwd(hidden, weight, labels, vocab_start, smoothing)
        if group is not None and world > 1:
            lse, tgt, sumx = _tp_merge(lse, tgt, sumx, group)
        loss = _loss_rows(lse, tgt, sumx, valid, opts, v_global)
        ctx.save_for_backward(hidden, weight, labels, lse, valid)
        ctx.opts, ctx.vocab_start, ctx.v_global, ctx.world, ctx.sink = opts, vocab_start, v_global, world, sink
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        hidden, weight, labels, lse, valid = ctx.saved_tensors
        opts = ctx.opts
        # A frozen head (weight.requires_grad False) computes and allocates no grad_weight at all.
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dh or need_dw):
            return None, None, None, None, None
        g = torch.where(valid, grad_rows.float(), 0.0).contiguous()
        coefs = (1.0 - opts.label_smoothing, opts.label_smoothing / ctx.v_global, 2.0 * opts.z_loss_weight)
        bwd = _triton_backward if opts.triton else _torch_backward
        main_grad = ctx.sink.main_grad if need_dw else None
        grad_h, grad_w = bwd(hidden, weight, labels, ctx.vocab_start, lse, g, coefs, opts.filter_eps, need_dh, need_dw,
                             main_grad)
        if main_grad is not None:
            ctx.sink.added()
        if need_dh and opts.tp_group is not None and ctx.world > 1:
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=opts.tp_group)  # ColumnParallelLinear's job
        grad_h = grad_h.to(hidden.dtype) if need_dh else None
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None


class _FusedLinearCrossEntropyGradsInForward(torch.autograd.Function):
    """The 3-pass path: a scalar loss whose gradients are computed in forward (scaled by 1 for 'sum', 1 / the
    number of valid labels for 'mean'); backward only multiplies them by the scalar upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, opts: FlceOptions, reduction: str, need_dh: bool, need_dw: bool,
                sink: "_MainGradSink"):
        v_global = weight.shape[0]
        valid = _valid_labels(labels, v_global, opts.ignore_index)
        hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
        n_valid = valid.sum().clamp(min=1).float() if reduction == "mean" else torch.ones((), device=hidden.device)
        g = torch.where(valid, 1.0 / n_valid, 0.0).contiguous()  # the 4-pass path's upstream gradient
        coefs = (1.0 - opts.label_smoothing, opts.label_smoothing / v_global, 2.0 * opts.z_loss_weight)
        run = _triton_forward_with_grads if opts.triton else _torch_forward_with_grads
        main_grad = sink.main_grad if need_dw else None
        lse, tgt, sumx, grad_h, grad_w = run(hidden, weight, labels, g, coefs, opts.filter_eps,
                                             opts.label_smoothing > 0, need_dh, need_dw, main_grad)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.need, ctx.used, ctx.sink = (need_dh, need_dw and main_grad is None), False, sink
        ctx.fused = main_grad is not None
        return _loss_rows(lse, tgt, sumx, valid, opts, v_global).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("fused_linear_cross_entropy: a second backward through a scalar loss is not "
                               "supported (its saved gradients were scaled in place); use reduction='none'")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        if ctx.fused:  # main_grad already holds the weight's gradient for an upstream gradient of exactly 1
            torch._assert_async(grad_loss == 1.0, "fused_linear_cross_entropy: main_grad was given, so the "
                                "scalar loss must be backwarded with gradient 1 (scale the main gradients instead)")
            ctx.sink.added()
        # In place: a scaled copy of grad_weight would hold a second [V, H] tensor at the peak.
        grad_h = grad_h.mul_(grad_loss) if ctx.need[0] else None
        grad_w = grad_w.mul_(grad_loss) if ctx.need[1] else None
        return grad_h, grad_w, None, None, None, None, None, None


@dataclass(frozen=True)
class _MainGradSink:
    """Where the weight's gradient goes instead of autograd (gradient-accumulation fusion), and whom to tell."""
    main_grad: Optional[torch.Tensor] = None
    on_added: Optional[Callable[[], None]] = None

    def added(self) -> None:
        if self.on_added is not None:
            self.on_added()


def _main_grad_sink(weight: torch.Tensor, main_grad, on_main_grad) -> _MainGradSink:
    if main_grad is None:
        if on_main_grad is not None:
            raise ValueError("on_main_grad is given without main_grad")
        return _MainGradSink()
    if not weight.requires_grad:
        raise ValueError("main_grad is given but weight does not require a gradient (a frozen head has none)")
    if main_grad.shape != weight.shape or main_grad.device != weight.device or not main_grad.is_contiguous():
        raise ValueError(f"main_grad must be a contiguous {tuple(weight.shape)} tensor on {weight.device}; got "
                         f"{tuple(main_grad.shape)} on {main_grad.device}")
    if main_grad.dtype not in (torch.float32, weight.dtype):
        raise ValueError(f"main_grad must be fp32 or the weight's dtype ({weight.dtype}); got {main_grad.dtype}")
    return _MainGradSink(main_grad, on_main_grad)


def grads_in_forward(reduction: str, hidden: torch.Tensor, weight: torch.Tensor, opts: FlceOptions) -> bool:
    """THE choice between the 3-pass and the 4-pass path (see the module docstring): gradients in forward
    when the loss is a scalar (its upstream gradient is one number, so the gradients can be formed before
    it is known and scaled after), a gradient is wanted, and the head is not vocab-parallel."""
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    tp = opts.tp_group is not None and dist.get_world_size(opts.tp_group) > 1
    return reduction != "none" and wants_grad and not tp


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100, reduction: str = "mean", tp_group=None,
                               z_loss_weight: float = 0.0, label_smoothing: float = 0.0,
                               filter_eps: float = 0.0, main_grad: Optional[torch.Tensor] = None,
                               on_main_grad: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels` without materialising the logits.

    hidden [N, H], weight [V_local, H] (same dtype), labels [N] long (global ids; `ignore_index` rows
    count for nothing). Returns an fp32 scalar ("mean": over non-ignored rows, 0 if none; "sum") or
    the per-row losses [N] ("none", 0 on ignored rows; differentiable for any upstream gradient).
    `tp_group`: vocab-parallel, see the module docstring (grad_hidden is all-reduced here).
    `filter_eps` > 0: CCE's gradient filtering (an approximation; FILTER_EPS_BF16 = 2**-12 is CCE's
    choice for bf16), off by default.
    `main_grad` (fp32 or the weight's dtype, the weight's shape): ADD the weight's gradient into it instead of
    returning it through autograd; `on_main_grad()` is called once it is in (see the module docstring's
    gradient-accumulation fusion: with a scalar loss the upstream gradient must be exactly 1).
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
    if not filter_eps >= 0.0:
        raise ValueError(f"filter_eps={filter_eps} must be >= 0 (0 turns gradient filtering off)")
    sink = _main_grad_sink(weight, main_grad, on_main_grad)
    opts = FlceOptions(ignore_index=ignore_index, z_loss_weight=z_loss_weight, label_smoothing=label_smoothing,
                       filter_eps=float(filter_eps), tp_group=tp_group, triton=use_triton(hidden, weight, labels))
    if grads_in_forward(reduction, hidden, weight, opts):
        return _FusedLinearCrossEntropyGradsInForward.apply(hidden, weight, labels.long(), opts, reduction,
                                                            hidden.requires_grad, weight.requires_grad, sink)
    loss_rows = _FusedLinearCrossEntropy.apply(hidden, weight, labels.long(), opts, sink)
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    n_valid = (labels != ignore_index).sum().clamp(min=1)
    return loss_rows.sum() / n_valid


def aot_specs() -> list:
    """The launches of the 7B head (H=3584, V_local=152064/tp, any N): per element type, dot precision,
    target arch, kernel and constexpr variant, at the tiles and num_stages the launch code uses."""
    return flce_aot_specs()
