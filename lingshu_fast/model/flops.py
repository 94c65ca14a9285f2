"""Model FLOPs of one packed micro-batch, for MFU. A multiply-add counts 2 FLOPs.

Forward, LLM (L layers, hidden H, q = heads*head_dim, kv = kv_heads*head_dim, MLP width I, vocab V),
for samples of lengths s_b with T = sum(s_b) tokens:
    dense     = 2 * T * [ L * (H*(q + 2*kv) + q*H + 3*H*I) + H*V ]
    attention = L * sum_b 2 * q * s_b * (s_b + 1)
The attention term counts the causal triangle actually computed by varlen kernels
(QK^T and PV, each 2*q FLOPs per (query, key) pair, s(s+1)/2 pairs), not the full square.

Forward, ViT (depth B, width D, MLP width Iv, merger width M = D*merge^2, output width O), per image
(t, h, w) with P = t*h*w patches:
    patch embed = 2 * P * 1176 * D
    blocks      = B * 2 * P * (3D^2 + D^2 + 3*D*Iv)  +  sum over blocks of 4 * D * sum_k w_k^2
                  (w_k: window lengths in window blocks, frame lengths h*w in full-attention blocks;
                   bidirectional, so the full square)
    merger      = 2 * (P / merge^2) * (M*M + M*O)
Biases, norms, rotary and softmax are left out (under 1% at 7B).

Training = 3 x forward (backward = 2 x forward: input and weight gradients). This is the usual MFU
convention; frozen groups (stage 1's LLM) really skip their weight gradients, so MFU then slightly
overstates the work done.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lingshu_fast.model.vision import window_layout


def _llm_attention(config, seq_lens: Sequence[int]) -> float:
    t = config.text_config
    q = t.num_attention_heads * (getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads)
    return float(t.num_hidden_layers * sum(2 * q * s * (s + 1) for s in seq_lens))


def _llm_flops(config, seq_lens: Sequence[int]) -> float:
    t = config.text_config
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    h, q, kv, inter = t.hidden_size, t.num_attention_heads * hd, t.num_key_value_heads * hd, t.intermediate_size
    tokens = sum(seq_lens)
    per_token = t.num_hidden_layers * (h * (q + 2 * kv) + q * h + 3 * h * inter) + h * t.vocab_size
    return 2.0 * tokens * per_token + _llm_attention(config, seq_lens)


def _vit_attention(config, grid: torch.Tensor) -> float:
    v = config.vision_config
    merge = v.spatial_merge_size
    _, cu_window, cu_frame = window_layout(grid, merge, v.window_size // merge // v.patch_size)
    window_sq = float(((cu_window[1:] - cu_window[:-1]).double() ** 2).sum())
    frame_sq = float(((cu_frame[1:] - cu_frame[:-1]).double() ** 2).sum())
    n_full = sum(1 for i in range(v.depth) if i in v.fullatt_block_indexes)
    return 4 * v.hidden_size * (n_full * frame_sq + (v.depth - n_full) * window_sq)


def _vit_flops(config, image_grid_thw: torch.Tensor) -> float:
    v = config.vision_config
    d, merge = v.hidden_size, v.spatial_merge_size
    patch_values = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    m = d * merge ** 2
    grid = torch.as_tensor(image_grid_thw).reshape(-1, 3)
    patches = int(grid.prod(-1).sum())
    dense = 2 * patches * (patch_values * d + v.depth * (4 * d * d + 3 * d * v.intermediate_size))
    merger = 2 * (patches // merge ** 2) * (m * m + m * v.out_hidden_size)
    return float(dense + merger) + _vit_attention(config, grid)


def attention_flops(config, seq_lens: Sequence[int], image_grid_thw: Optional[torch.Tensor] = None) -> float:
    """The attention-score part (QK^T and PV) of `forward_flops`, LLM + ViT: what selective recompute
    runs again in backward."""
    has_images = image_grid_thw is not None and len(image_grid_thw) > 0
    vit = _vit_attention(config, torch.as_tensor(image_grid_thw).reshape(-1, 3)) if has_images else 0.0
    return _llm_attention(config, [int(s) for s in seq_lens]) + vit


def forward_flops(config, seq_lens: Sequence[int], image_grid_thw: Optional[torch.Tensor] = None) -> dict[str, float]:
    """{"llm": ..., "vit": ...} forward FLOPs of one packed micro-batch (formula in the module doc)."""
    lens = [int(s) for s in seq_lens]
    vit = 0.0 if image_grid_thw is None or len(image_grid_thw) == 0 else _vit_flops(config, image_grid_thw)
    return {"llm": _llm_flops(config, lens), "vit": vit}


def training_flops(config, seq_lens: Sequence[int], image_grid_thw: Optional[torch.Tensor] = None) -> float:
    """Forward + backward FLOPs (3 x forward) of one packed micro-batch; `seq_lens` from cu_seqlens diffs."""
    return 3.0 * sum(forward_flops(config, seq_lens, image_grid_thw).values())


def pipeline_layer_split(config, pp: int, *, seq_len: int = 8192, image_patches: int = 0) -> list[tuple[int, int]]:
    """Contiguous decoder-layer ranges [start, end) for `pp` stages, minimising the costliest stage.

    Stage costs are forward FLOPs of one micro-batch of `seq_len` tokens (one sample: the attention
    term is then an upper bound) holding `image_patches` ViT patches (one square-ish image, window
    layout as the ViT's): the first stage also pays for the ViT, the last for the LM head.
    """
    t = config.text_config
    layers = t.num_hidden_layers
    if not 1 <= pp <= layers:
        raise ValueError(f"parallel.pp={pp} must be between 1 and the number of decoder layers ({layers})")
    head = 2.0 * seq_len * t.hidden_size * t.vocab_size
    per_layer = (_llm_flops(config, [seq_len]) - head) / layers
    vit = 0.0
    if image_patches > 0:
        merge = config.vision_config.spatial_merge_size
        side = max(merge, int(round(image_patches ** 0.5 / merge)) * merge)
        vit = _vit_flops(config, torch.tensor([[1, side, side]]))

    def cost(start: int, end: int) -> float:
        return per_layer * (end - start) + (vit if start == 0 else 0.0) + (head if end == layers else 0.0)

    # best[k][e]: minimal max-stage cost placing layers [0, e) on k stages; tiny DP (L <= ~100)
    inf = float("inf")
    best = [[inf] * (layers + 1) for _ in range(pp + 1)]
    cut = [[0] * (layers + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for k in range(1, pp + 1):
        for e in range(k, layers + 1):
            for s in range(k - 1, e):
                value = max(best[k - 1][s], cost(s, e))
                if value < best[k][e]:
                    best[k][e], cut[k][e] = value, s
    ranges, end = [], layers
    for k in range(pp, 0, -1):
        ranges.append((cut[k][end], end))
        end = cut[k][end]
    return ranges[::-1]
