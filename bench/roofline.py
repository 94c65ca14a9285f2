"""A roofline MODEL of lingshu_fast's Triton kernels and of Liger's and Cut Cross-Entropy's fused CE.

Predicted times, not measurements: `python bench/roofline.py` prints them for the A100, H100 and H200
side by side. The GPU bench rows (bench/test_bench_flce.py) store measured / predicted in their
extra_info, so the first GPU run says how far each prediction is off.

Each kernel's FLOPs and HBM bytes come from its own launch configuration: the tiles of
kernels/_flce_triton.py for the card's arch, its split and stripe planners, and its grid order.
Liger (0.8.5) and CCE (25.1.1) are modelled from the algorithms in their sources, the same way.

The model, stated:
- Peaks: dense tensor-core FLOP/s and HBM bandwidth of the SXM cards, at 100% (a pure roofline);
  a kernel's time is max(FLOPs / peak, HBM bytes / bandwidth, L2 bytes / L2 bandwidth), and kernels
  run back to back. Measured / predicted is then the fraction of the roofline a kernel reaches.
- L2 reuse ("wave model"): programs run in waves of one program per SM, in launch order. An operand
  panel (a tile row of A or column of B, streamed over the K loop) read by several programs of one
  wave comes from HBM once per wave; a panel of the previous wave is still an L2 hit when that
  wave's panels took at most half the L2. Nothing else is reused.
- Atomics and locked adds read and write through L2 (8 bytes per fp32 element, 4 per bf16);
  outputs a program owns go to HBM once.
- Gradient filtering keeps a fraction `keep` of the (row block, vocabulary tile) tiles, the same for
  every implementation that filters (it depends on the data; CCE also sorts the vocabulary to raise it).
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass, field

from lingshu_fast.kernels import _flce_triton as tk

MODEL_NOTE = "MODEL: roofline predictions (pure peaks, wave L2 model), not measurements"


@dataclass(frozen=True)
class Card:
    name: str
    arch: int
    sms: int
    tc_tflops: float  # dense bf16 tensor-core peak
    tf32_tflops: float
    hbm_tb_s: float
    l2_mb: float
    l2_tb_s: float  # L2 bandwidth: A100 from its whitepaper (5120 B/clk at 1.41 GHz); Hopper assumed 1.5x


CARDS = {
    "A100": Card("A100-SXM4-80GB", 80, 108, 312.0, 156.0, 2.039, 40.0, 7.2),
    "H100": Card("H100-SXM5-80GB", 90, 132, 989.4, 494.7, 3.35, 50.0, 10.8),
    "H200": Card("H200-SXM-141GB", 90, 132, 989.4, 494.7, 4.8, 50.0, 10.8),
}


@dataclass
class Cost:
    """One kernel (or a sequence of them): FLOPs, HBM and L2-only bytes, and time on a card."""
    name: str
    flops: float = 0.0
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    ms: float = 0.0
    parts: list = field(default_factory=list)


def kernel_cost(name: str, card: Card, flops: float, hbm_bytes: float, l2_bytes: float = 0.0,
                tflops: float | None = None) -> Cost:
    peak = (tflops or card.tc_tflops) * 1e12
    ms = 1e3 * max(flops / peak, hbm_bytes / (card.hbm_tb_s * 1e12), l2_bytes / (card.l2_tb_s * 1e12))
    return Cost(name, flops, hbm_bytes, l2_bytes, ms)


def chain(name: str, costs: list) -> Cost:
    return Cost(name, sum(c.flops for c in costs), sum(c.hbm_bytes for c in costs), sum(c.l2_bytes for c in costs),
                sum(c.ms for c in costs), parts=list(costs))


@functools.lru_cache(maxsize=None)  # the stripes of one pass repeat the same arguments
def wave_panel_bytes(order: tuple, sms: int, l2_bytes: float, a_bytes: float, b_bytes: float) -> float:
    """HBM bytes of the operand panels read by programs `order` [(a_index, b_index), ...] under the wave
    model: per wave, each distinct a panel costs a_bytes and b panel b_bytes, unless the previous wave
    read it and that wave's panels fit in half the L2."""
    total, carried = 0.0, set()
    for start in range(0, len(order), sms):
        wave = order[start:start + sms]
        panels = {("a", a) for a, _ in wave} | {("b", b) for _, b in wave}
        total += sum(a_bytes if kind == "a" else b_bytes for kind, _ in panels - carried)
        wave_bytes = sum(a_bytes if kind == "a" else b_bytes for kind, _ in panels)
        carried = panels if wave_bytes <= l2_bytes / 2 else set()
    return total


@functools.lru_cache(maxsize=None)
def grouped_order(n_major: int, n_minor: int, group: int) -> tuple:
    """The launch order of `_flce_triton._grouped`: (major, minor) per program id."""
    out = []
    for pid in range(n_major * n_minor):
        per_group = group * n_minor
        first = (pid // per_group) * group
        size = min(n_major - first, group)
        out.append((first + (pid % per_group) % size, (pid % per_group) // size))
    return tuple(out)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- lingshu_fast: fused CE --------------------------------------------------------------------------

def lingshu_flce_forward(card: Card, n: int, h: int, v: int, elem: int = 2, key: str = "16bit") -> Cost:
    cfg = tk.FWD_CONFIGS[(key, card.arch)]
    n_rb, n_vt = _cdiv(n, cfg.block_n), _cdiv(v, cfg.block_v)
    splits = tk.plan_splits(n_rb, n_vt, card.sms, int(card.l2_mb * 2**20), cfg.block_n * h * elem)
    per_split = _cdiv(n_vt, splits)
    splits = _cdiv(n_vt, per_split)
    order = tuple((pid // splits, pid % splits) for pid in range(n_rb * splits))  # splits fastest
    panels = wave_panel_bytes(order, card.sms, card.l2_mb * 2**20, cfg.block_n * h * elem,
                              per_split * cfg.block_v * h * elem)
    flops = 2.0 * n_rb * cfg.block_n * n_vt * cfg.block_v * h
    partials = 2 * splits * n * 4 * 2  # lse and target partials written, then merged by torch
    return kernel_cost(f"lingshu fwd ({n_rb}x{splits} programs)", card, flops, panels + partials)


def lingshu_flce_backward(card: Card, n: int, h: int, v: int, elem: int = 2, key: str = "16bit",
                          keep: float = 1.0, need_dw: bool = True, main_grad: bool = False) -> Cost:
    """The three kernels per vocabulary stripe; `keep` the fraction of dlogits tiles kept by the filter.
    `main_grad`: dW is added into the fp32 main gradient (read + write of the tiles with a kept row block)
    instead of written once in W's dtype."""
    cfg = tk.BWD_CONFIGS[(key, card.arch)]
    l2 = card.l2_mb * 2**20
    n_rb, n_vt = _cdiv(n, cfg.block_n), _cdiv(v, cfg.block_v)
    tiles = tk.plan_stripe_tiles(n, n_vt, cfg.block_v, elem, tk.STRIPE_BYTES)
    n_ht = _cdiv(h, cfg.block_h_out)
    s_cols = tiles * cfg.block_v
    costs = []
    stripes = [min(tiles, n_vt - t0) for t0 in range(0, n_vt, tiles)]
    for t in sorted(set(stripes)):  # full stripes share one cost; the last may be narrower
        count, cols = stripes.count(t), t * cfg.block_v
        k1 = wave_panel_bytes(grouped_order(n_rb, t, cfg.group), card.sms, l2, cfg.block_n * h * elem,
                              cfg.block_v * h * elem)
        k1 += keep * n * cols * elem  # dlogits tiles stored
        k1_cost = kernel_cost("dlogits", card, 2.0 * n_rb * cfg.block_n * cols * h, k1)
        part = [k1_cost]
        if need_dw:
            out = cols * h * 8 * (1.0 - (1.0 - keep) ** n_rb) if main_grad else cols * h * elem
            k2 = keep * wave_panel_bytes(grouped_order(t, n_ht, cfg.group), card.sms, l2, n * cfg.block_v * elem,
                                         n * cfg.block_h_out * elem) + out
            part.append(kernel_cost("dW", card, keep * 2.0 * n * cols * h, k2))
        touched = 1.0 - (1.0 - keep) ** t  # row blocks with a kept tile in the stripe: the others skip
        k3 = keep * wave_panel_bytes(grouped_order(n_rb, n_ht, cfg.group), card.sms, l2, cfg.block_n * cols * elem,
                                     cols * cfg.block_h_out * elem) + touched * n * h * 4 * 2
        part.append(kernel_cost("dE", card, keep * 2.0 * n * cols * h, k3))
        costs += part * count
    cast = kernel_cost("cast dE", card, 0.0, n * h * (4 + elem))
    out = chain(f"lingshu bwd ({len(stripes)} stripes of {s_cols})", costs + [cast])
    return out


def lingshu_flce_memory_gb(n: int, h: int, v: int, elem: int = 2, key: str = "16bit", arch: int = 90,
                           main_grad: bool = False) -> float:
    """Peak extra bytes of fwd+bwd: grad_weight (W's dtype; none with `main_grad`), grad_hidden fp32 + its
    cast, the D stripe."""
    cfg = tk.BWD_CONFIGS[(key, arch)]
    tiles = tk.plan_stripe_tiles(n, _cdiv(v, cfg.block_v), cfg.block_v, elem, tk.STRIPE_BYTES)
    grad_w = 0 if main_grad else v * h * elem
    return (grad_w + n * h * (4 + elem) + n * tiles * cfg.block_v * elem + n * 4 * 4) / 1e9


def lingshu_flce_three_pass(card: Card, n: int, h: int, v: int, elem: int = 2, key: str = "16bit",
                            keep: float = 1.0, need_dw: bool = True, with_sumx: bool = False,
                            main_grad: bool = False) -> Cost:
    """The 3-pass path (scalar loss): per row stripe of `plan_row_stripe` rows, the logits kernel (GEMM,
    stores exp(x - tile max) and fp32 partials), the torch lse merge, the in-place dlogits kernel, dW
    accumulated into grad_weight (W's dtype; stripes after the first read and write the [V, H] rows of
    the tiles they keep) and dE rows written once. Then backward's in-place scale of both by the scalar
    upstream gradient (counted always; it is one multiply even when that gradient is 1).
    `main_grad` (gradient-accumulation fusion): every stripe, the first too, reads and writes the fp32 main
    gradient's rows of the tiles it keeps, the stripe planner doubles the rows for it, and backward scales
    only dE."""
    cfg = tk.BWD_CONFIGS[(key, card.arch)]
    l2 = card.l2_mb * 2**20
    rows = tk.plan_row_stripe(n, cfg.block_n, card.arch, 4 // elem if main_grad else 1)
    n_vt, n_ht = _cdiv(v, cfg.block_v), _cdiv(h, cfg.block_h_out)
    n_parts = 4 if with_sumx else 3
    costs = [kernel_cost("zero dE", card, 0.0, n * h * elem)]
    for i, r0 in enumerate(range(0, n, rows)):
        m = min(rows, n - r0)
        n_rb = _cdiv(m, cfg.block_n)
        k1 = wave_panel_bytes(grouped_order(n_rb, n_vt, cfg.group), card.sms, l2, cfg.block_n * h * elem,
                              cfg.block_v * h * elem) + m * v * elem + n_parts * n_vt * m * 4
        costs.append(kernel_cost("logits", card, 2.0 * n_rb * cfg.block_n * n_vt * cfg.block_v * h, k1))
        costs.append(kernel_cost("lse merge", card, 0.0, (n_parts - 1) * n_vt * m * 4 + 3 * m * 4))
        costs.append(kernel_cost("dlogits", card, 0.0, m * v * elem * (1 + keep) + n_vt * m * 4))
        if need_dw:
            touched = 1.0 - (1.0 - keep) ** n_rb  # vocabulary tiles with a kept row block in the stripe
            gw = v * h * 8 * touched if main_grad else v * h * elem * (1 if i == 0 else 2 * touched)
            k2 = keep * wave_panel_bytes(grouped_order(n_vt, n_ht, cfg.group), card.sms, l2, m * cfg.block_v * elem,
                                         m * cfg.block_h_out * elem) + gw
            costs.append(kernel_cost("dW", card, keep * 2.0 * m * v * h, k2))
        k3 = keep * wave_panel_bytes(grouped_order(n_rb, n_ht, cfg.group), card.sms, l2, cfg.block_n * v * elem,
                                     v * cfg.block_h_out * elem) + m * h * elem
        costs.append(kernel_cost("dE", card, keep * 2.0 * m * v * h, k3))
    fwd = chain(f"lingshu 3-pass fwd ({_cdiv(n, rows)} row stripes of {rows})", costs)
    scaled = n * h + (v * h if need_dw and not main_grad else 0)
    bwd = kernel_cost("lingshu 3-pass bwd (scale)", card, 0.0, 2 * scaled * elem)
    return chain("lingshu 3-pass", [fwd, bwd])


def lingshu_three_pass_memory_gb(n: int, h: int, v: int, elem: int = 2, key: str = "16bit", arch: int = 90,
                                 main_grad: bool = False) -> float:
    """Peak extra bytes of the 3-pass path: grad_weight (W's dtype; none with `main_grad`), the saved dE
    (hidden's dtype), the X stripe [rows, V], the fp32 partials [4, tiles, rows] and the lse / target / g
    vectors."""
    cfg = tk.BWD_CONFIGS[(key, arch)]
    rows = tk.plan_row_stripe(n, cfg.block_n, arch, 4 // elem if main_grad else 1)
    grad_w = 0 if main_grad else v * h * elem
    return (grad_w + n * h * elem + rows * v * elem + 4 * _cdiv(v, cfg.block_v) * rows * 4 + n * 4 * 3) / 1e9


def hook_add(card: Card, v: int, h: int, elem: int = 2) -> Cost:
    """The trainer's post-accumulate-grad hook for a head whose loss returns grad_weight through autograd:
    main_grad (fp32) += grad_weight (W's dtype), a read of both and a write of main_grad."""
    return kernel_cost("main_grad += grad_weight", card, 0.0, v * h * (elem + 8))


# ---- Liger-Kernel 0.8.5 (ops/fused_linear_cross_entropy.py) -----------------------------------------------

def liger_chunk_rows(n: int, h: int, v: int) -> int:
    """Liger's chunk: next_power_of_2(ceil(N / ceil(V / H))), at most N."""
    return min(n, 1 << max(0, math.ceil(math.log2(_cdiv(n, _cdiv(v, h))))))


def liger_flce(card: Card, n: int, h: int, v: int, elem: int = 2) -> Cost:
    """Everything runs in Liger's forward: per chunk of C rows a cuBLAS logits GEMM (W read once), its CE
    kernel (reads the logits twice, writes the gradient in place), grad_input = D @ W and a bf16
    grad_weight += D^T @ h (addmm into the weight-dtype accumulator: read + write of [V, H])."""
    c = liger_chunk_rows(n, h, v)
    costs = [kernel_cost("zeros", card, 0.0, (v * h + n * h) * elem)]
    for rows in [min(c, n - s) for s in range(0, n, c)]:
        gemm = 2.0 * rows * v * h
        costs += [kernel_cost("logits", card, gemm, (v * h + rows * h + rows * v) * elem),
                  kernel_cost("ce", card, 0.0, 3 * rows * v * elem),
                  kernel_cost("grad_input", card, gemm, (rows * v + v * h + rows * h) * elem),
                  kernel_cost("grad_weight", card, gemm, (rows * v + rows * h + 2 * v * h) * elem)]
    return chain(f"liger fwd+bwd ({_cdiv(n, c)} chunks of {c})", costs)


def liger_memory_gb(n: int, h: int, v: int, elem: int = 2) -> float:
    return (liger_chunk_rows(n, h, v) * v * elem + v * h * elem + n * h * elem + n * 4) / 1e9


# ---- Cut Cross-Entropy 25.1.1 (cce_lse_forward.py, cce_backward.py) ------------------------------------

CCE_TILE = (128, 128)  # BLOCK_B x BLOCK_V: one of its autotune configs (the model's assumption), GROUP_B 8


def cce_forward(card: Card, n: int, h: int, v: int, elem: int = 2) -> Cost:
    bb, bv = CCE_TILE
    n_b, n_v = _cdiv(n, bb), _cdiv(v, bv)
    panels = wave_panel_bytes(grouped_order(n_b, n_v, 8), card.sms, card.l2_mb * 2**20, bb * h * elem, bv * h * elem)
    return kernel_cost("cce fwd", card, 2.0 * n_b * bb * n_v * bv * h, panels + n * 4 * 2)


def cce_backward(card: Card, n: int, h: int, v: int, elem: int = 2, keep: float = 1.0) -> Cost:
    """One program per (row block, vocabulary tile), grouped by 8 row blocks: recompute the tile; if kept,
    locked bf16 read-add-write of its [BB, H] rows of dE and [BV, H] rows of dC through L2. dC of a
    vocabulary tile leaves L2 between groups of row blocks: one HBM read + write per group."""
    bb, bv = CCE_TILE
    n_b, n_v = _cdiv(n, bb), _cdiv(v, bv)
    panels = wave_panel_bytes(grouped_order(n_b, n_v, 8), card.sms, card.l2_mb * 2**20, bb * h * elem, bv * h * elem)
    flops = 2.0 * n_b * bb * n_v * bv * h * (1 + 2 * keep)
    l2 = keep * n_b * n_v * (bb + bv) * h * elem * 2
    hbm = panels + keep * (_cdiv(n_b, 8) * v * h * elem * 2 + n * h * elem * 2)
    return kernel_cost("cce bwd", card, flops, hbm, l2)


def cce_memory_gb(n: int, h: int, v: int, elem: int = 2) -> float:
    return (v * h * elem + n * h * elem + n * 4) / 1e9


# ---- the other kernels ----------------------------------------------------------------------------------

def grpo_loss(card: Card, n: int, h: int, v: int, elem: int = 2) -> Cost:
    """fused_linear_grpo_loss = the fused CE forward (log-probs) + its backward with per-token gradients
    (dW into the fp32 main gradient, as the trainer runs it); the PPO arithmetic is elementwise on [N]
    vectors (a few vector passes, bytes only)."""
    return chain("grpo loss fwd+bwd", [lingshu_flce_forward(card, n, h, v, elem),
                                       kernel_cost("ppo [N] math", card, 0.0, 12 * n * 4),
                                       lingshu_flce_backward(card, n, h, v, elem, main_grad=True)])


def image_pack(card: Card, rows: int, out_elem: int = 2) -> Cost:
    """Bandwidth-bound: per output row 3 x 196 bytes read, 1176 values written (the 3 KB table stays in L2)."""
    return kernel_cost("image pack", card, 0.0, rows * (3 * 196 + 1176 * out_elem))


def grpo_advantages(card: Card, rollouts: int) -> Cost:
    """Per rollout: rewards read 3x and the advantage written (fp32), permutation read 3x and segment end
    once (int64), head flag (int8); on top of it the torch sort and scans of the launch code (~4 passes)."""
    return kernel_cost("grpo advantages", card, 0.0, rollouts * (4 * 4 + 8 * 4 + 1) + 4 * rollouts * 16)


# ---- the table ----------------------------------------------------------------------------------------------

FLCE_SHAPE = dict(n=16384, h=3584, v=152064)  # the 7B head, bf16
GRPO_SHAPE = dict(n=16 * 1024, h=4096, v=128256)  # Liger's GRPO benchmark shape
PACK_ROWS = 64 * 1024  # about 64 mixed-size images


def flce_rows(card: Card, keep: float, n: int, h: int, v: int) -> dict:
    ours = chain("lingshu", [lingshu_flce_forward(card, n, h, v), lingshu_flce_backward(card, n, h, v, keep=keep)])
    cce = chain("cce", [cce_forward(card, n, h, v), cce_backward(card, n, h, v, keep=keep)])
    return {"lingshu 3-pass": lingshu_flce_three_pass(card, n, h, v, keep=keep), "lingshu 4-pass": ours, "cce": cce,
            "liger": liger_flce(card, n, h, v)}


def trainer_rows(card: Card, keep: float, n: int, h: int, v: int) -> dict[str, Cost]:
    """Fused CE fwd+bwd as the trainer needs it: the head's gradient ends in its fp32 main gradient. Ours
    adds it there in the dW kernel (`main_grad`); a loss returning grad_weight through autograd pays the
    grad buffer's hook on top (and holds that grad_weight until the hook has run)."""
    hook = hook_add(card, v, h)
    cce = chain("cce", [cce_forward(card, n, h, v), cce_backward(card, n, h, v, keep=keep), hook])
    return {"lingshu 3-pass into main_grad": lingshu_flce_three_pass(card, n, h, v, keep=keep, main_grad=True),
            "lingshu 3-pass + hook": chain("lingshu", [lingshu_flce_three_pass(card, n, h, v, keep=keep), hook]),
            "cce + hook": cce, "liger + hook": chain("liger", [liger_flce(card, n, h, v), hook])}


def trainer_memory_gb(n: int, h: int, v: int) -> dict[str, float]:
    """Extra memory of fwd+bwd in the trainer (the fp32 main gradient exists either way: not counted)."""
    return {"lingshu 3-pass into main_grad": lingshu_three_pass_memory_gb(n, h, v, main_grad=True),
            "lingshu 4-pass into main_grad": lingshu_flce_memory_gb(n, h, v, main_grad=True),
            "lingshu 3-pass + hook": lingshu_three_pass_memory_gb(n, h, v),
            "cce + hook": cce_memory_gb(n, h, v), "liger + hook": liger_memory_gb(n, h, v)}


def predicted_ms(provider: str, pass_name: str, card_key: str, n: int, h: int, v: int, keep: float = 1.0) -> float:
    """The model's time of one bench row (bench/test_bench_flce.py): Liger does all its work in forward,
    and so does lingshu there (the bench's loss is a 'mean', the 3-pass path); "lingshu_4pass" is the
    per-row-loss path (reduction='none')."""
    card = CARDS[card_key]
    if provider == "liger":
        total = liger_flce(card, n, h, v).ms
        return {"fwd": total, "bwd": 0.0, "fwd_bwd": total}[pass_name]
    if provider in ("lingshu", "lingshu_main_grad"):
        f, b = lingshu_flce_three_pass(card, n, h, v, keep=keep, main_grad=provider == "lingshu_main_grad").parts
        return {"fwd": f.ms, "bwd": b.ms, "fwd_bwd": f.ms + b.ms}[pass_name]
    fwd, bwd = {"lingshu_4pass": (lingshu_flce_forward, lingshu_flce_backward),
                "cce": (cce_forward, cce_backward)}[provider]
    f, b = fwd(card, n, h, v).ms, bwd(card, n, h, v, keep=keep).ms
    return {"fwd": f, "bwd": b, "fwd_bwd": f + b}[pass_name]


def card_of(device_name: str) -> str | None:
    """The CARDS key of a CUDA device name (torch.cuda.get_device_name), None if not modelled."""
    return next((k for k in CARDS if k in device_name.upper()), None)


def table(keep: float = 0.1) -> str:
    s = FLCE_SHAPE
    lines = [f"{MODEL_NOTE}.",
             f"Fused CE at N={s['n']:,}, H={s['h']:,}, V={s['v']:,}, bf16, forward + backward, ms:", "",
             "| | " + " | ".join(CARDS) + " |", "|---|" + "---|" * len(CARDS)]
    for label, k in (("filtering off", 1.0), (f"filtering on (keep {keep:.0%} of tiles)", keep)):
        rows = {c: flce_rows(card, k, **s) for c, card in CARDS.items()}
        for impl in ("lingshu 3-pass", "lingshu 4-pass", "liger", "cce"):
            if impl == "liger" and k != 1.0:
                continue  # Liger has no gradient filter
            lines.append(f"| {impl}, {label} | " + " | ".join(f"{rows[c][impl].ms:.1f}" for c in CARDS) + " |")
    g = dict(n=8192, h=2304, v=256000)  # Gemma-2-2B: CCE's paper measured CCE 135 ms, Liger 303 ms (A100)
    a100 = CARDS["A100"]
    lines += ["", f"Check against published figures (Gemma-2-2B head, N=8,192, A100, CCE's paper): model "
              f"CCE {flce_rows(a100, keep, **g)['cce'].ms:.0f} ms (filtering on) vs 135 measured, Liger "
              f"{liger_flce(a100, **g).ms:.0f} ms vs 303 measured: the model is a lower bound."]
    lines += ["", "In the trainer (the head's gradient must end in its fp32 main gradient: ours adds it there in the "
              "dW kernel, a loss returning grad_weight pays the grad buffer's hook on top), ms:", "",
              "| | " + " | ".join(CARDS) + " |", "|---|" + "---|" * len(CARDS)]
    for label, k in (("filtering off", 1.0), (f"filtering on (keep {keep:.0%})", keep)):
        rows = {c: trainer_rows(card, k, **s) for c, card in CARDS.items()}
        for impl in rows["H100"]:
            if impl.startswith("liger") and k != 1.0:
                continue
            lines.append(f"| {impl}, {label} | " + " | ".join(f"{rows[c][impl].ms:.1f}" for c in CARDS) + " |")
    lines += ["", "Extra memory in the trainer (GB, the main gradient not counted: it exists for every "
              "parameter): " + ", ".join(f"{k} {gb:.2f}" for k, gb in trainer_memory_gb(**s).items())]
    lines += ["", "Extra memory of fwd+bwd (GB, grad_weight included): lingshu 3-pass "
              f"{lingshu_three_pass_memory_gb(**s):.2f} (saved dE in bf16, the [rows, V] stripe), lingshu 4-pass "
              f"{lingshu_flce_memory_gb(**s):.2f} (fp32 grad_hidden and its cast, the [N, S] stripe), "
              f"Liger {liger_memory_gb(**s):.2f}, CCE {cce_memory_gb(**s):.2f}", "", "Other kernels, ms:", "",
              "| kernel | " + " | ".join(CARDS) + " |", "|---|" + "---|" * len(CARDS)]
    others = (("GRPO loss fwd+bwd (N=16,384, H=4,096, V=128,256)", lambda c: grpo_loss(c, **GRPO_SHAPE)),
              (f"image pack ({PACK_ROWS:,} rows, bf16)", lambda c: image_pack(c, PACK_ROWS)),
              ("GRPO advantages (4,096 rollouts)", lambda c: grpo_advantages(c, 4096)))
    for label, fn in others:
        lines.append(f"| {label} | " + " | ".join(f"{fn(card).ms:.4g}" for card in CARDS.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=MODEL_NOTE)
    parser.add_argument("--keep", type=float, default=0.1, help="fraction of tiles the gradient filter keeps")
    print(table(parser.parse_args(argv).keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
