"""Qwen2 decoder layers on tensor-parallel layers, and the 3-D M-RoPE tables.

A decoder layer is `layer(hidden [T, H], cos [T, D], sin [T, D], cu_seqlens [B+1], max_seqlen)`:
pre-norm GQA attention (q/k/v with bias, fused into one column-parallel matmul holding this rank's
query heads and its KV heads), causal inside each packed sample, then a pre-norm SwiGLU MLP
(gate/up fused as [gate shard; up shard]). Layers are independent modules so the pipeline can
place any contiguous range of them on a stage.

M-RoPE: position_ids [3, T] hold (temporal, height, width) positions. The head_dim/2 rotary
frequencies are split into `mrope_section` = (s_t, s_h, s_w) groups; group i takes its angle
from axis i. After that selection it is a plain rotate-half RoPE (ops.apply_rotary).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lingshu_fast.model.attention import varlen_attention
from lingshu_fast.model.ops import apply_rotary, swiglu
from lingshu_fast.model.parallel_linear import ColumnLinear, RowLinear
from lingshu_fast.model.recompute import activation_then, maybe_checkpoint
from lingshu_fast.model.vision import RMSNorm


def mrope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, section: list[int], dtype: torch.dtype):
    """cos, sin [T, head_dim] for position_ids [3, T] (a [T] tensor means text-only, same on all axes)."""
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0).expand(3, -1)
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [3, T, D/2]
    chunks = freqs.split(section, dim=-1)
    selected = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)  # [T, D/2]
    emb = torch.cat([selected, selected], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class DecoderLayer(nn.Module):
    def __init__(self, tcfg, tp: int, mcfg, dtype: torch.dtype, layer_id: int):
        super().__init__()
        hidden = tcfg.hidden_size
        self.layer_id = layer_id  # global index: HF name model.layers.{layer_id}
        self.head_dim = getattr(tcfg, "head_dim", None) or hidden // tcfg.num_attention_heads
        self.q_heads = tcfg.num_attention_heads // tp
        self.kv_heads = tcfg.num_key_value_heads // tp
        qkv_out = (tcfg.num_attention_heads + 2 * tcfg.num_key_value_heads) * self.head_dim
        self.input_layernorm = RMSNorm(hidden, tcfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(hidden, tcfg.rms_norm_eps, dtype)
        self.qkv = ColumnLinear(hidden, qkv_out, bias=True, config=mcfg)
        self.o_proj = RowLinear(tcfg.num_attention_heads * self.head_dim, hidden, bias=False, config=mcfg)
        self.gate_up = ColumnLinear(hidden, 2 * tcfg.intermediate_size, bias=False, config=mcfg)
        self.down_proj = RowLinear(tcfg.intermediate_size, hidden, bias=False, config=mcfg)
        self.attention_backend = "auto"
        self.selective = False  # selective recompute of the attention core and the MLP activation (recompute.py)

    def attention_core(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                       max_seqlen: int) -> torch.Tensor:
        """Rotary + causal varlen attention: fused qkv [T, (q + 2 kv) * d] -> [T, q * d]."""
        d = self.head_dim
        tokens = qkv.shape[0]  # all T tokens, also under sequence parallelism (x holds T/tp)
        q, k, v = qkv.split([self.q_heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q, k = apply_rotary(q.view(tokens, self.q_heads, d), k.view(tokens, self.kv_heads, d), cos, sin)
        attn = varlen_attention(q, k, v.view(tokens, self.kv_heads, d), cu_seqlens, max_seqlen, causal=True,
                                backend=self.attention_backend)
        return attn.reshape(tokens, -1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
        qkv = self.qkv(self.input_layernorm(x))
        attn = maybe_checkpoint(self.attention_core, qkv, cos, sin, cu_seqlens, max_seqlen, active=self.selective)
        x = x + self.o_proj(attn)
        gate, up = self.gate_up(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        if self.selective:
            return x + activation_then(swiglu, (gate, up), self.down_proj)
        return x + self.down_proj(swiglu(gate, up))
