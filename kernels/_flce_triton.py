"""The Triton side of the fused linear cross-entropy: kernels, production tiles, planners, launch order.

`fused_linear_cross_entropy.py` holds the op (reference, autograd) and its design notes,
`_flce_launch.py` the launch code, `_flce_aot.py` the AOT specs; this file holds what the compiler
sees. The 4-pass path's four kernels, all GEMM-shaped, none with atomics:
- `_flce_fwd_kernel`: per (row block, vocabulary split) an online log-sum-exp over the split's tiles.
- `_flce_dlogits_kernel`: per (row block, vocabulary tile) of one vocabulary STRIPE, recomputes the
  logits tile, forms dlogits, applies the gradient filter and stores the tile into the stripe buffer
  D [N, S] (plus a keep flag per tile).
- `_flce_dw_kernel`: grad_weight rows of the stripe = D^T @ hidden, K = N, over the kept row blocks
  of each vocabulary tile; written once, in the weight's dtype (no fp32 [V, H] buffer).
- `_flce_de_kernel`: grad_hidden += D @ weight[stripe], K = S, over the kept vocabulary tiles of
  each row block; each program owns its [BLOCK_N, BLOCK_H] tile, so the add needs no atomic.
The 3-pass path (a scalar loss, gradients in forward, per row stripe of all of V): `_flce_logits_kernel`
(GEMM: exp(x - tile max) into X and fp32 partials), `_flce_softmax_grad_kernel` (X -> g * dlogits in
place, keep flags), then `_flce_dw_kernel` with ACCUMULATE (grad_weight += X^T @ hidden) and
`_flce_de_kernel` (grad_hidden rows = X @ W, stored in the input dtype).
Launch order: 1-D grids in grouped super-tiles (`_grouped`), so that GROUP programs sharing an
operand tile run in the same wave and read it from L2, not HBM (bench/roofline.py models this).
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl


@dataclass(frozen=True)
class FwdConfig:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BwdConfig:
    """block_n x block_v: the dlogits tile (and the filter's tile); block_h: its K step over H;
    block_h_out: the H width of the grad_weight / grad_hidden output tiles; group: super-tile size."""
    block_n: int
    block_v: int
    block_h: int
    block_h_out: int
    num_warps: int
    stages_dlogits: int
    stages_grad: int
    group: int = 8


# Production tiles per (operand kind, arch), checked by the AOT compile at H=3584 under triton 3.6 and
# 3.9: every tl.dot dimension >= 16, shared memory within the card, no spills. 16-bit inputs take
# 128-row tiles (wgmma on Hopper); fp32 inputs (twice the bytes per tile) take 64-row tiles.
FWD_CONFIGS = {("16bit", 90): FwdConfig(128, 128, 64, 8, 3), ("16bit", 80): FwdConfig(128, 128, 32, 8, 3),
               ("tf32", 90): FwdConfig(128, 128, 32, 8, 3), ("tf32", 80): FwdConfig(128, 128, 16, 8, 4),
               ("ieee", 90): FwdConfig(64, 128, 16, 8, 3), ("ieee", 80): FwdConfig(64, 128, 16, 8, 3)}
BWD_CONFIGS = {("16bit", 90): BwdConfig(128, 128, 64, 128, 8, 3, 3),
               ("16bit", 80): BwdConfig(128, 128, 32, 128, 8, 3, 2),
               ("tf32", 90): BwdConfig(64, 128, 32, 64, 8, 3, 3),
               ("tf32", 80): BwdConfig(64, 128, 32, 64, 8, 3, 2),
               ("ieee", 90): BwdConfig(64, 64, 16, 32, 8, 2, 2),  # FMA dots hold operands in registers:
               ("ieee", 80): BwdConfig(64, 64, 16, 32, 8, 2, 2)}  # 64-wide K steps, 32-wide outputs
# Under TRITON_INTERPRET small tiles make the tests' tiny shapes span several ragged tiles.
INTERPRET_FWD = FwdConfig(16, 32, 16, 4, 1)
INTERPRET_BWD = BwdConfig(16, 32, 16, 16, 4, 1, 1, group=2)
SM_COUNT = {80: 108, 90: 132}  # A100, H100 (H200: 132)


def softmax_grad_warps(cfg: BwdConfig) -> int:
    """Warps of the in-place dlogits kernel (no dot): 64 tile elements per thread. 8 warps on the fp32
    64x64 tile left ptxas at 48 registers with a 4-byte spill on sm_80; 4 warps on 128x128 spill too."""
    return max(1, cfg.block_n * cfg.block_v // (64 * 32))


STRIPE_BYTES = 64 << 20  # budget of the dlogits stripe buffer D [N, S] on a GPU
INTERPRET_STRIPE_TILES = 2  # the interpreter: two tiles per stripe, so tests cross stripe borders


def plan_splits(n_row_blocks: int, n_v_tiles: int, sms: int, l2_bytes: int, row_block_bytes: int) -> int:
    """Vocabulary splits of the forward grid (n_row_blocks x splits programs, splits fastest).

    A wave of `sms` programs covers sms / splits row blocks; their hidden states stay in L2 while the
    wave sweeps its splits if they take at most a quarter of L2, which sets the fewest splits. Among up
    to twice that many, the count whose last wave is fullest wins (ties: fewer splits, fewer weight
    re-reads: each wave streams the weight once)."""
    resident = max(1, (l2_bytes // 4) // max(row_block_bytes, 1))
    lo = min(n_v_tiles, max(1, -(-sms // resident)))
    best, best_fill = lo, -1.0
    for splits in range(lo, min(n_v_tiles, 2 * lo) + 1):
        programs = n_row_blocks * splits
        fill = programs / (-(-programs // sms) * sms)
        if fill > best_fill + 1e-9:
            best, best_fill = splits, fill
    return best


# Tensor-core FLOPs per HBM byte of the cards (A100: 312 TFLOP/s / 2.04 TB/s, H100: 989 / 3.35; the H200,
# 4.8 TB/s, takes the H100's figure): bench/roofline.py's card numbers.
TC_FLOP_PER_HBM_BYTE = {80: 153, 90: 295}
INTERPRET_ROW_STRIPE_BLOCKS = 2  # the interpreter: two row blocks per 3-pass stripe, so tests cross stripes


def plan_row_stripe(n_rows: int, block_n: int, arch: int, rmw_ratio: int = 1) -> int:
    """Rows per stripe of the 3-pass path (a multiple of block_n, at most N rounded up). Each stripe adds
    its D^T @ hidden into grad_weight, a read and a write of [V, H] (2 x 2 bytes per element in 16 bit)
    against 2 x rows FLOPs per element; the stripe is the shortest for which that GEMM stays compute-bound:
    rows >= 2 bytes x the card's FLOP/byte balance (fp32 with tf32: twice the bytes at half the peak).
    `rmw_ratio`: bytes of the accumulated grad_weight element over the input's (2 when 16-bit inputs add
    into an fp32 main gradient: twice the bytes per stripe, so twice the rows)."""
    rows = -(-2 * rmw_ratio * TC_FLOP_PER_HBM_BYTE[arch] // block_n) * block_n
    return min(rows, -(-n_rows // block_n) * block_n)


def plan_stripe_tiles(n_rows: int, n_v_tiles: int, block_v: int, elem_bytes: int, budget_bytes: int) -> int:
    """Vocabulary tiles per backward stripe: as many as the D [N, S] buffer's budget allows (>= 1)."""
    return max(1, min(n_v_tiles, budget_bytes // max(1, n_rows * block_v * elem_bytes)))


@triton.jit
def _grouped(pid, n_major, n_minor, GROUP: tl.constexpr):
    """(i_major, i_minor) of program `pid` when GROUP consecutive major blocks form a super-tile: inside
    it the major index varies fastest, so GROUP programs sharing one minor tile run back to back."""
    per_group = GROUP * n_minor
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_major - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


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
    """The [BLOCK_N, BLOCK_V] fp32 logits tile hidden[rows] @ weight[cols].T, masked rows/cols as 0."""
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
                     N, H, V, vocab_start, tiles_per_split, n_splits, stride_hn, stride_wv,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     WITH_SUMX: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Splits vary fastest: the programs of one wave share a few row blocks, whose hidden states stay in
    # L2 while each split streams its own weight tiles (read by every row block of the wave at once).
    pid = tl.program_id(0)
    pid_n = pid // n_splits
    pid_s = pid % n_splits
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
def _dlogits_of(p, cols, col_ok, live, lse, local_label, target_coef, smooth_per_class, z2):
    """Unscaled dlogits of an fp32 probabilities tile p: p (1 + z2 lse) - c_t onehot - c_s on the rows with
    a gradient (`live`) and the valid columns, 0 elsewhere (so a padded entry never keeps a tile)."""
    d = p * (1.0 + z2 * lse)[:, None]
    d -= tl.where(cols[None, :] == local_label[:, None], target_coef, 0.0)
    return tl.where(live[:, None] & col_ok[None, :], d - smooth_per_class, 0.0)


@triton.jit
def _flce_dlogits_kernel(h_ptr, w_ptr, labels_ptr, lse_ptr, g_ptr, d_ptr, keep_ptr,
                         N, H, V, vocab_start, col0, stripe_tiles,
                         target_coef, smooth_per_class, z2, filter_eps,
                         stride_hn, stride_wv, stride_dn,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                         GROUP: tl.constexpr, FILTER: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One dlogits tile of the stripe starting at column col0: D = g * (p (1 + z2 lse) - c_t onehot - c_s).
    keep[row block, tile] = 0 (and nothing stored) when no row has a gradient, or, with FILTER, when
    every |p (1 + z2 lse) - c_t onehot - c_s| of the rows with a gradient is below filter_eps (CCE's
    rule, judged before the upstream scale g so that 'mean' does not filter everything)."""
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), stripe_tiles, GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = col0 + local_cols
    row_ok = rows < N
    col_ok = cols < V
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # 0 on ignored rows
    live = g != 0.0
    keep = tl.max(live.to(tl.int32), 0)
    if keep != 0:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        local_label = tl.load(labels_ptr + rows, mask=row_ok, other=0) - vocab_start
        x = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                         BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST)
        d = _dlogits_of(tl.exp(x - lse[:, None]), cols, col_ok, live, lse, local_label, target_coef,
                        smooth_per_class, z2)
        if FILTER:
            keep = (tl.max(tl.max(tl.abs(d), 1), 0) >= filter_eps).to(tl.int32)
        if keep != 0:
            tl.store(d_ptr + rows[:, None] * stride_dn + local_cols[None, :],
                     (d * g[:, None]).to(d_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(keep_ptr + pid_n * stripe_tiles + pid_v, keep.to(tl.int8))


@triton.jit
def _dw_sum(acc, d_ptr, h_ptr, kept_rows_ptr, n_kept, pid_v, local_cols, col_ok, ks, k_ok, N, stripe_tiles,
            stride_dn, stride_hn, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    for i in range(0, n_kept):
        rows = tl.load(kept_rows_ptr + i * stripe_tiles + pid_v) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        d_t = tl.load(d_ptr + rows[None, :] * stride_dn + local_cols[:, None],
                      mask=row_ok[None, :] & col_ok[:, None], other=0.0)
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(d_t, h, acc, DOT_PRECISION, UPCAST)
    return acc


@triton.jit
def _flce_dw_kernel(d_ptr, h_ptr, kept_rows_ptr, n_kept_ptr, gw_ptr,
                    N, H, V, col0, stripe_tiles, stride_dn, stride_hn, stride_gwv,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    ACCUMULATE: tl.constexpr):
    """grad_weight[col0 + tile rows, h tile] = sum over the kept row blocks of D[rows, tile]^T @ hidden.
    kept_rows[i, t] is the i-th kept row block of vocabulary tile t (n_kept[t] of them), in ascending
    order, so the sum's order is fixed: the result is bit-stable run to run. ACCUMULATE (the row
    stripes of the 3-pass path): add to the stored grad_weight in fp32, and leave tiles with no kept
    row block untouched (their grad_weight rows are neither read nor written)."""
    pid_v, pid_h = _grouped(tl.program_id(0), stripe_tiles, tl.cdiv(H, BLOCK_H), GROUP)
    local_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = col0 + local_cols < V
    ks = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    k_ok = ks < H
    n_kept = tl.load(n_kept_ptr + pid_v)
    out = gw_ptr + (col0 + local_cols)[:, None] * stride_gwv + ks[None, :]
    out_ok = col_ok[:, None] & k_ok[None, :]
    if ACCUMULATE:
        if n_kept > 0:
            acc = tl.load(out, mask=out_ok, other=0.0).to(tl.float32)
            acc = _dw_sum(acc, d_ptr, h_ptr, kept_rows_ptr, n_kept, pid_v, local_cols, col_ok, ks, k_ok, N,
                          stripe_tiles, stride_dn, stride_hn, BLOCK_N, DOT_PRECISION, UPCAST)
            tl.store(out, acc.to(gw_ptr.dtype.element_ty), mask=out_ok)
    else:
        acc = _dw_sum(tl.zeros([BLOCK_V, BLOCK_H], tl.float32), d_ptr, h_ptr, kept_rows_ptr, n_kept, pid_v,
                      local_cols, col_ok, ks, k_ok, N, stripe_tiles, stride_dn, stride_hn, BLOCK_N,
                      DOT_PRECISION, UPCAST)
        tl.store(out, acc.to(gw_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _flce_de_kernel(d_ptr, w_ptr, kept_cols_ptr, n_kept_ptr, gh_ptr,
                    N, H, V, col0, stripe_tiles, stride_dn, stride_wv, stride_ghn,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """grad_hidden[rows, h tile] += sum over the row block's kept tiles t of D[rows, t] @ weight[t, h tile].
    The program owns its output tile (no atomics); kept_cols[r, i] lists tiles in ascending order."""
    pid_n, pid_h = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(H, BLOCK_H), GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ks = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    k_ok = ks < H
    n_kept = tl.load(n_kept_ptr + pid_n)
    if n_kept > 0:
        out = gh_ptr + rows[:, None] * stride_ghn + ks[None, :]
        out_ok = row_ok[:, None] & k_ok[None, :]
        acc = tl.load(out, mask=out_ok, other=0.0).to(tl.float32)  # fp32, or the input dtype (3-pass)
        for i in range(0, n_kept):
            local_cols = tl.load(kept_cols_ptr + pid_n * stripe_tiles + i) * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = col0 + local_cols < V
            d = tl.load(d_ptr + rows[:, None] * stride_dn + local_cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            w = tl.load(w_ptr + (col0 + local_cols)[:, None] * stride_wv + ks[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dot(d, w, acc, DOT_PRECISION, UPCAST)
        tl.store(out, acc.to(gh_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _flce_logits_kernel(h_ptr, w_ptr, labels_ptr, x_ptr, max_part_ptr, lse_part_ptr, tgt_part_ptr, sumx_part_ptr,
                        N, H, V, vocab_start, stride_hn, stride_wv, stride_xn,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        GROUP: tl.constexpr, WITH_SUMX: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """3-pass path, GEMM 1 of a row stripe: per (row block, vocabulary tile), exp(x - m) with m the tile's
    row max is stored into X [rows, V] in the input dtype (values in [0, 1], so bf16 keeps every
    probability to 2**-9 relative; raw bf16 logits of magnitude 20 would lose 6%), and fp32 partials per
    row (m, the tile's log-sum-exp, target logit, logit sum) into [tiles, rows] buffers: the loss is as
    exact as the 4-pass forward's.
    Grouped order: GROUP row blocks share each weight tile while it is in L2."""
    n_v_tiles = tl.cdiv(V, BLOCK_V)
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_v_tiles, GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    x = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                     BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST)
    local_label = tl.load(labels_ptr + rows, mask=row_ok, other=0) - vocab_start
    xm = tl.where(col_ok[None, :], x, float("-inf"))
    m = tl.max(xm, 1)  # finite: each tile has a valid column
    e = tl.exp(xm - m[:, None])
    tl.store(x_ptr + rows[:, None] * stride_xn + cols[None, :], e.to(x_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    out = pid_v * N + rows
    tl.store(max_part_ptr + out, m, mask=row_ok)
    tl.store(lse_part_ptr + out, m + tl.log(tl.sum(e, 1)), mask=row_ok)
    tgt = tl.sum(tl.where(col_ok[None, :] & (cols[None, :] == local_label[:, None]), x, 0.0), 1)
    tl.store(tgt_part_ptr + out, tgt, mask=row_ok)
    if WITH_SUMX:
        tl.store(sumx_part_ptr + out, tl.sum(tl.where(col_ok[None, :], x, 0.0), 1), mask=row_ok)


@triton.jit
def _flce_softmax_grad_kernel(x_ptr, max_part_ptr, labels_ptr, lse_ptr, g_ptr, keep_ptr, N, V, vocab_start,
                              target_coef, smooth_per_class, z2, filter_eps, stride_xn,
                              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, FILTER: tl.constexpr):
    """3-pass path, between the GEMMs: turns the tile exp(x - m) of X into g * dlogits IN PLACE
    (p = exp(x - m) exp(m - lse)), with the
    4-pass path's formula, filter rule and keep flag (`_dlogits_of`; tiles not kept are not stored and
    left out of the dW / dE kernels). Element-wise: the plain row-major order is enough."""
    n_v_tiles = tl.cdiv(V, BLOCK_V)
    pid_n = tl.program_id(0) // n_v_tiles
    pid_v = tl.program_id(0) % n_v_tiles
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # 0 on ignored rows
    live = g != 0.0
    keep = tl.max(live.to(tl.int32), 0)
    if keep != 0:
        ptrs = x_ptr + rows[:, None] * stride_xn + cols[None, :]
        e = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        m = tl.load(max_part_ptr + pid_v * N + rows, mask=row_ok, other=0.0)
        local_label = tl.load(labels_ptr + rows, mask=row_ok, other=0) - vocab_start
        d = _dlogits_of(e * tl.exp(m - lse)[:, None], cols, col_ok, live, lse, local_label, target_coef,
                        smooth_per_class, z2)
        if FILTER:
            keep = (tl.max(tl.max(tl.abs(d), 1), 0) >= filter_eps).to(tl.int32)
        if keep != 0:
            tl.store(ptrs, (d * g[:, None]).to(x_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    tl.store(keep_ptr + pid_n * n_v_tiles + pid_v, keep.to(tl.int8))


def config_key(is_fp32: bool, precision: str) -> str:
    return precision if is_fp32 else "16bit"
