"""Launch code of the fused linear cross-entropy's Triton kernels (`_flce_triton.py`): which tiles, splits
and stripes run on this device, and the kernel sequence of each path. `fused_linear_cross_entropy.py`
holds the op, its plain-PyTorch reference, the autograd functions and the design notes."""
from __future__ import annotations

import torch
import triton

from lingshu_fast.kernels import _flce_triton as tk
from lingshu_fast.kernels._dispatch import interpreting


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting; 16-bit inputs always use tensor cores.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast_dots(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreting()


def _arch(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _configs(dtype: torch.dtype, device: torch.device) -> tuple[tk.FwdConfig, tk.BwdConfig]:
    """The tiles the Triton path launches on this device (the interpreter's on CPU); the reference's
    gradient filter judges the same backward tiles."""
    arch = _arch(device)
    if arch is None:
        return tk.INTERPRET_FWD, tk.INTERPRET_BWD
    key = (tk.config_key(dtype == torch.float32, _dot_precision(dtype)), arch)
    return tk.FWD_CONFIGS[key], tk.BWD_CONFIGS[key]


def _num_v_splits(n_row_blocks: int, n_v_tiles: int, row_block_bytes: int, device: torch.device) -> int:
    if device.type != "cuda":
        return min(n_v_tiles, 2)  # the interpreter: exercise the split merge without slowing tests
    props = torch.cuda.get_device_properties(device)
    return tk.plan_splits(n_row_blocks, n_v_tiles, props.multi_processor_count, props.L2_cache_size, row_block_bytes)


def _triton_forward(hidden, weight, labels, vocab_start: int, with_sumx: bool):
    n_rows, h_dim = hidden.shape
    v_local = weight.shape[0]
    cfg = _configs(hidden.dtype, hidden.device)[0]
    n_row_blocks = triton.cdiv(n_rows, cfg.block_n)
    n_v_tiles = triton.cdiv(v_local, cfg.block_v)
    splits = _num_v_splits(n_row_blocks, n_v_tiles, cfg.block_n * h_dim * hidden.element_size(), hidden.device)
    tiles_per_split = triton.cdiv(n_v_tiles, splits)
    splits = triton.cdiv(n_v_tiles, tiles_per_split)  # every split owns >= 1 valid tile
    parts = torch.empty(3 if with_sumx else 2, splits, n_rows, device=hidden.device, dtype=torch.float32)
    sumx_buf = parts[2] if with_sumx else parts[1]
    tk._flce_fwd_kernel[(n_row_blocks * splits,)](
        hidden, weight, labels, parts[0], parts[1], sumx_buf,
        n_rows, h_dim, v_local, vocab_start, tiles_per_split, splits, hidden.stride(0), weight.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, WITH_SUMX=with_sumx,
        DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST=_upcast_dots(hidden.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    lse = torch.logsumexp(parts[0], dim=0)
    return lse, parts[1].sum(0), (parts[2].sum(0) if with_sumx else None)


def _kept_lists(keep: torch.Tensor):
    """From keep [row blocks, tiles] (int8): per tile its kept row blocks, per row block its kept tiles,
    each ascending and packed to the front (stable sort of 'not kept'), with their counts (int32)."""
    dropped = (keep == 0).to(torch.int8)
    kept_rows = torch.argsort(dropped, dim=0, stable=True).to(torch.int32).contiguous()
    kept_cols = torch.argsort(dropped, dim=1, stable=True).to(torch.int32).contiguous()
    kept = keep != 0
    return kept_rows, kept.sum(0, dtype=torch.int32), kept_cols, kept.sum(1, dtype=torch.int32)


def _triton_backward(hidden, weight, labels, vocab_start, lse, g, coefs, filter_eps: float,
                     need_dh: bool, need_dw: bool, main_grad=None):
    """Stripe by stripe of the vocabulary: dlogits tiles into D [N, S] (kernel 1), then grad_weight of the
    stripe from D (kernel 2, written once; with `main_grad`, added into it and nothing of [V, H] is
    allocated) and grad_hidden += D @ W_stripe (kernel 3). No atomics."""
    n_rows, h_dim = hidden.shape
    v_local = weight.shape[0]
    cfg = _configs(hidden.dtype, hidden.device)[1]
    n_rb, n_vt = triton.cdiv(n_rows, cfg.block_n), triton.cdiv(v_local, cfg.block_v)
    budget = tk.STRIPE_BYTES if hidden.is_cuda else tk.INTERPRET_STRIPE_TILES * n_rows * cfg.block_v * hidden.element_size()
    stripe_tiles = tk.plan_stripe_tiles(n_rows, n_vt, cfg.block_v, hidden.element_size(), budget)
    d_buf = torch.empty(n_rows, stripe_tiles * cfg.block_v, device=hidden.device, dtype=hidden.dtype)
    keep_buf = torch.empty(n_rb * stripe_tiles, device=hidden.device, dtype=torch.int8)
    grad_h = torch.zeros(n_rows, h_dim, device=hidden.device, dtype=torch.float32) if need_dh else None
    fused = need_dw and main_grad is not None
    grad_w = main_grad if fused else (torch.empty_like(weight) if need_dw else None)  # written once: W's dtype
    n_h_tiles = triton.cdiv(h_dim, cfg.block_h_out)
    dot = dict(DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST=_upcast_dots(hidden.dtype))
    for first_tile in range(0, n_vt, stripe_tiles):
        tiles = min(stripe_tiles, n_vt - first_tile)
        col0 = first_tile * cfg.block_v
        keep = keep_buf[:n_rb * tiles].view(n_rb, tiles)
        tk._flce_dlogits_kernel[(n_rb * tiles,)](
            hidden, weight, labels, lse, g, d_buf, keep, n_rows, h_dim, v_local, vocab_start, col0, tiles,
            *coefs, filter_eps, hidden.stride(0), weight.stride(0), d_buf.stride(0),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP=cfg.group, FILTER=filter_eps > 0,
            **dot, num_warps=cfg.num_warps, num_stages=cfg.stages_dlogits)
        kept_rows, n_kept_per_tile, kept_cols, n_kept_per_row_block = _kept_lists(keep)
        if need_dw:
            tk._flce_dw_kernel[(tiles * n_h_tiles,)](
                d_buf, hidden, kept_rows, n_kept_per_tile, grad_w, n_rows, h_dim, v_local, col0, tiles,
                d_buf.stride(0), hidden.stride(0), grad_w.stride(0),
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h_out, GROUP=cfg.group,
                ACCUMULATE=fused, **dot, num_warps=cfg.num_warps, num_stages=cfg.stages_grad)
        if need_dh:
            tk._flce_de_kernel[(n_rb * n_h_tiles,)](
                d_buf, weight, kept_cols, n_kept_per_row_block, grad_h, n_rows, h_dim, v_local, col0, tiles,
                d_buf.stride(0), weight.stride(0), grad_h.stride(0),
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h_out, GROUP=cfg.group,
                **dot, num_warps=cfg.num_warps, num_stages=cfg.stages_grad)
    return grad_h, (None if fused else grad_w)


def _row_stripe_rows(n_rows: int, cfg: tk.BwdConfig, device: torch.device, rmw_ratio: int) -> int:
    arch = _arch(device)
    if arch is None:
        return min(n_rows, tk.INTERPRET_ROW_STRIPE_BLOCKS * cfg.block_n)
    return tk.plan_row_stripe(n_rows, cfg.block_n, arch, rmw_ratio)


def _triton_forward_with_grads(hidden, weight, labels, g, coefs, filter_eps: float, with_sumx: bool,
                               need_dh: bool, need_dw: bool, main_grad=None):
    """The 3-pass path, row stripe by row stripe (all of V per stripe, X [rows, V] in the input dtype):
    exp(logits - tile max) into X with fp32 partials (GEMM 1), lse, X -> g * dlogits in place, grad_weight += X^T @
    hidden (GEMM 2, fp32 sums added to W's dtype, or into `main_grad` from the first stripe on: then no [V, H]
    buffer is allocated and grad_weight is returned as None), grad_hidden rows = X @ W (GEMM 3, written once)."""
    n_rows, h_dim = hidden.shape
    v_local = weight.shape[0]
    cfg = _configs(hidden.dtype, hidden.device)[1]
    fused = need_dw and main_grad is not None
    target = main_grad if fused else weight  # what each stripe reads and writes back: its bytes set the stripe
    rows = _row_stripe_rows(n_rows, cfg, hidden.device, target.element_size() // hidden.element_size())
    n_vt, n_ht = triton.cdiv(v_local, cfg.block_v), triton.cdiv(h_dim, cfg.block_h_out)
    x_buf = torch.empty(rows, v_local, device=hidden.device, dtype=hidden.dtype)
    n_parts = 4 if with_sumx else 3  # per (tile, row): max, log-sum-exp, target logit [, logit sum]
    parts_buf = torch.empty(n_parts * n_vt * rows, device=hidden.device, dtype=torch.float32)
    keep_buf = torch.empty(triton.cdiv(rows, cfg.block_n) * n_vt, device=hidden.device, dtype=torch.int8)
    lse = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
    tgt, sumx = torch.empty_like(lse), (torch.empty_like(lse) if with_sumx else None)
    grad_h = torch.zeros_like(hidden) if need_dh else None  # rows of a row block with no kept tile stay 0
    grad_w = main_grad if fused else (torch.empty_like(weight) if need_dw else None)  # stripe 1 writes all
    dot = dict(DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST=_upcast_dots(hidden.dtype))
    for r0 in range(0, n_rows, rows):
        m = min(rows, n_rows - r0)
        n_rb = triton.cdiv(m, cfg.block_n)
        h_s, lab_s = hidden[r0:r0 + m], labels[r0:r0 + m]
        parts = parts_buf[:n_parts * n_vt * m].view(n_parts, n_vt, m)
        tk._flce_logits_kernel[(n_rb * n_vt,)](
            h_s, weight, lab_s, x_buf, parts[0], parts[1], parts[2], parts[n_parts - 1], m, h_dim, v_local, 0,
            hidden.stride(0), weight.stride(0), x_buf.stride(0), BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
            BLOCK_H=cfg.block_h, GROUP=cfg.group, WITH_SUMX=with_sumx, **dot,
            num_warps=cfg.num_warps, num_stages=cfg.stages_dlogits)
        torch.logsumexp(parts[1], dim=0, out=lse[r0:r0 + m])
        torch.sum(parts[2], dim=0, out=tgt[r0:r0 + m])
        if with_sumx:
            torch.sum(parts[3], dim=0, out=sumx[r0:r0 + m])
        keep = keep_buf[:n_rb * n_vt].view(n_rb, n_vt)
        tk._flce_softmax_grad_kernel[(n_rb * n_vt,)](
            x_buf, parts[0], lab_s, lse[r0:r0 + m], g[r0:r0 + m], keep, m, v_local, 0, *coefs, filter_eps,
            x_buf.stride(0),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, FILTER=filter_eps > 0,
            num_warps=tk.softmax_grad_warps(cfg), num_stages=1)
        kept_rows, n_kept_per_tile, kept_cols, n_kept_per_row_block = _kept_lists(keep)
        if need_dw:
            tk._flce_dw_kernel[(n_vt * n_ht,)](
                x_buf, h_s, kept_rows, n_kept_per_tile, grad_w, m, h_dim, v_local, 0, n_vt,
                x_buf.stride(0), hidden.stride(0), grad_w.stride(0),
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h_out, GROUP=cfg.group,
                ACCUMULATE=fused or r0 > 0, **dot, num_warps=cfg.num_warps, num_stages=cfg.stages_grad)
        if need_dh:
            tk._flce_de_kernel[(n_rb * n_ht,)](
                x_buf, weight, kept_cols, n_kept_per_row_block, grad_h[r0:r0 + m], m, h_dim, v_local, 0, n_vt,
                x_buf.stride(0), weight.stride(0), grad_h.stride(0),
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h_out, GROUP=cfg.group,
                **dot, num_warps=cfg.num_warps, num_stages=cfg.stages_grad)
    return lse, tgt, sumx, grad_h, (None if fused else grad_w)
