"""Qwen2.5-VL vision tower on tensor-parallel layers: patch embed, window-attention blocks, 2x2 merger.

Many images of different sizes go through in one call: `pixel_values` [P, 3*2*14*14] holds every
image's patches back to back (the HF processor's order: per image, per frame, 2x2 merge blocks
row-major, the 4 patches of a block consecutive) and `image_grid_thw` [n, 3] their grids.

- Patch embed: HF's Conv3d with kernel = stride = (2, 14, 14) over one patch is a linear map of
  its 1176 values; we keep it as a replicated [hidden, 1176] matrix (HF's weight reshaped).
- 2-D RoPE: each patch rotates by its (row, col); head_dim/4 frequencies per axis.
- Window attention: tokens are reordered so that each window of (window_size/patch/merge)^2 merge
  units is contiguous; window blocks attend within windows, `fullatt_block_indexes` blocks within
  whole frames, both through varlen `cu_seqlens`. The merger runs in window order, then the
  inverse permutation restores the processor's order.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lingshu_fast.model.attention import varlen_attention
from lingshu_fast.model.ops import apply_rotary, rms_norm, swiglu
from lingshu_fast.model.parallel_linear import make_linear
from lingshu_fast.model.recompute import activation_then, layer_policy, maybe_checkpoint
from lingshu_fast.model.sequence_parallel import sync_grad

_VISION_NORM_EPS = 1e-6  # hard-coded in HF's vision blocks and merger


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps
        self.sync_group = None  # sequence parallel: all-reduce the weight's gradient over this group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.sync_group is None else sync_grad(self.weight, self.sync_group)
        return rms_norm(x, weight, self.eps)


def window_layout(grid_thw: torch.Tensor, merge: int, window_merged: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window order of the merge units of a batch of images.

    Returns `window_index` [units] (unit ids in window order: the ViT's permutation), `cu_window_seqlens`
    [windows+1] and `cu_frame_seqlens` [frames+1], both in patches (a unit is merge*merge patches).
    A window covers `window_merged` x `window_merged` units; edge windows are smaller.
    """
    unit = merge * merge
    index_parts, window_lengths, frame_lengths = [], [], []
    offset = 0
    for t, h, w in grid_thw.tolist():
        uh, uw = h // merge, w // merge
        n_wh, n_ww = -(-uh // window_merged), -(-uw // window_merged)
        frame = torch.arange(t).view(t, 1, 1)
        row = torch.arange(uh).view(1, uh, 1)
        col = torch.arange(uw).view(1, 1, uw)
        window_id = (frame * n_wh + row // window_merged) * n_ww + col // window_merged
        # sort key: window first, then row-major inside the window (unique per unit)
        key = (window_id * window_merged + row % window_merged) * window_merged + col % window_merged
        order = torch.argsort(key.reshape(-1))
        index_parts.append(order + offset)
        counts = torch.bincount(window_id.expand(t, uh, uw).reshape(-1), minlength=t * n_wh * n_ww)
        window_lengths.append(counts[counts > 0] * unit)
        frame_lengths.append(torch.full((t,), h * w))
        offset += t * uh * uw
    window_index = torch.cat(index_parts)
    cu_window = F.pad(torch.cat(window_lengths).cumsum(0), (1, 0)).to(torch.int32)
    cu_frame = F.pad(torch.cat(frame_lengths).cumsum(0), (1, 0)).to(torch.int32)
    return window_index, cu_window, cu_frame


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch [P, 2], in the processor's merge-block-major order."""
    parts = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        # block-major: (block row, block col, row in block, col in block)
        pos = torch.stack([rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)], dim=-1)
        parts.append(pos.repeat(t, 1))
    return torch.cat(parts)


class VisionBlock(nn.Module):
    def __init__(self, vcfg, tp: int, mcfg, dtype: torch.dtype):
        super().__init__()
        dim, inter, sharded = vcfg.hidden_size, vcfg.intermediate_size, tp > 1
        self.heads_local = vcfg.num_heads // tp
        self.head_dim = dim // vcfg.num_heads
        self.norm1 = RMSNorm(dim, _VISION_NORM_EPS, dtype)
        self.norm2 = RMSNorm(dim, _VISION_NORM_EPS, dtype)
        # rank-local [q; k; v] heads and [gate; up] rows
        self.qkv = make_linear("column", dim, 3 * dim, bias=True, config=mcfg, sharded=sharded)
        self.proj = make_linear("row", dim, dim, bias=True, config=mcfg, sharded=sharded)
        self.gate_up = make_linear("column", dim, 2 * inter, bias=True, config=mcfg, sharded=sharded)
        self.down = make_linear("row", inter, dim, bias=True, config=mcfg, sharded=sharded)
        self.attention_backend = "auto"
        self.selective = False  # selective recompute of the attention core and the MLP activation (recompute.py)

    def attention_core(self, qkv, cos, sin, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        """2-D rotary + bidirectional varlen attention: qkv [P, 3 * local width] -> [P, local width]."""
        tokens = qkv.shape[0]
        q, k, v = qkv.view(tokens, 3, self.heads_local, self.head_dim).unbind(1)
        q, k = apply_rotary(q, k, cos, sin)
        attn = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False, backend=self.attention_backend)
        return attn.reshape(tokens, -1)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen: int):
        qkv = self.qkv(rms_norm(x, self.norm1.weight, self.norm1.eps))
        attn = maybe_checkpoint(self.attention_core, qkv, cos, sin, cu_seqlens, max_seqlen, active=self.selective)
        x = x + self.proj(attn)
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        if self.selective:
            return x + activation_then(swiglu, (gate, up), self.down)
        return x + self.down(swiglu(gate, up))


class PatchMerger(nn.Module):
    def __init__(self, vcfg, tp: int, mcfg, dtype: torch.dtype):
        super().__init__()
        self.width = vcfg.hidden_size * vcfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(vcfg.hidden_size, _VISION_NORM_EPS, dtype)
        self.fc1 = make_linear("column", self.width, self.width, bias=True, config=mcfg, sharded=tp > 1)
        self.fc2 = make_linear("row", self.width, vcfg.out_hidden_size, bias=True, config=mcfg, sharded=tp > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.ln_q(x).view(-1, self.width))))


class VisionTower(nn.Module):
    """Submodules: `patch_embed` and `blocks` (group "vision"), `merger` (group "merger").
    `tp` is the tower's own TP size: the model's, or 1 when it is replicated (config.check_tensor_parallel)."""

    def __init__(self, vcfg, tp: int, mcfg, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.tp = vcfg, tp
        patch_values = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
        self.patch_embed = nn.Linear(patch_values, vcfg.hidden_size, bias=False, dtype=dtype)
        self.blocks = nn.ModuleList([VisionBlock(vcfg, tp, mcfg, dtype) for _ in range(vcfg.depth)])
        self.merger = PatchMerger(vcfg, tp, mcfg, dtype)
        head_dim = vcfg.hidden_size // vcfg.num_heads
        theta = (vcfg.rope_parameters or {}).get("rope_theta", 10000.0)
        spatial = head_dim // 2
        inv_freq = 1.0 / theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.activation_checkpointing = "none"  # none | full | selective (recompute.py), set by the model
        self.checkpoint_every_k_layers = 1

    def set_recompute(self, policy: str, every_k: int) -> None:
        self.activation_checkpointing, self.checkpoint_every_k_layers = policy, every_k
        for i, block in enumerate(self.blocks):
            block.selective = layer_policy(policy, i, every_k) == "selective"

    def _rotary(self, grid_thw: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = patch_positions(grid_thw, self.cfg.spatial_merge_size).to(device)
        freqs = pos[..., None].float() * self.inv_freq.to(device)  # [P, 2, head_dim/4]
        freqs = freqs.flatten(1)  # rows' frequencies then columns'
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[P, 1176] patches -> [P / merge^2, out_hidden] merged tokens, in the processor's order."""
        cfg = self.cfg
        grid_thw = grid_thw.cpu()
        expected = int(grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != expected:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw implies {expected}")
        merge = cfg.spatial_merge_size
        unit = merge * merge
        window_index, cu_window, cu_frame = window_layout(
            grid_thw, merge, cfg.window_size // merge // cfg.patch_size)
        device = pixel_values.device
        window_index = window_index.to(device)
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        patches = x.shape[0]

        def to_windows(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(patches // unit, unit, -1)[window_index].reshape(patches, -1)

        x = to_windows(x)
        cos, sin = (to_windows(t) for t in self._rotary(grid_thw, device))
        max_window = int((cu_window[1:] - cu_window[:-1]).max())
        max_frame = int((cu_frame[1:] - cu_frame[:-1]).max())
        cu_window, cu_frame = cu_window.to(device), cu_frame.to(device)
        for i, block in enumerate(self.blocks):
            whole_frame = i in cfg.fullatt_block_indexes
            args = (x, cos, sin, cu_frame if whole_frame else cu_window, max_frame if whole_frame else max_window)
            recompute = layer_policy(self.activation_checkpointing, i, self.checkpoint_every_k_layers) == "full"
            x = maybe_checkpoint(block, *args, active=recompute)
        merged = self.merger(x)
        return merged[torch.argsort(window_index)]
