"""The one dispatch point for the model's elementwise ops: RMSNorm, SwiGLU and rotary embedding.

Each op asks `_use_liger(...)` (which defers to `lingshu_fast.kernels._dispatch.use_triton`) once at
entry: on CUDA tensors it runs Liger-Kernel's Triton kernel (LINGSHU_KERNELS=torch turns it off),
otherwise the plain-PyTorch reference below, which is written to match transformers' Qwen2.5-VL maths exactly in fp32.
M-RoPE needs no kernel of its own: the (t, h, w) section selection happens once per forward when
building cos/sin (language.py), after which it is an ordinary rotate-half rotation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lingshu_fast.kernels._dispatch import use_triton


def _use_liger(*tensors: torch.Tensor) -> bool:
    """Liger on CUDA tensors only: its kernels do not run under TRITON_INTERPRET (checked with
    liger-kernel 0.8.5: a scalar `.to` fails), so LINGSHU_KERNELS=triton on CPU keeps the
    reference here and the model stays usable in tests that force Triton for other ops."""
    if not all(t.is_cuda for t in tensors) or not use_triton(*tensors):
        return False
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * x / sqrt(mean(x^2) + eps), the statistics in fp32 (as transformers)."""
    if _use_liger(x):
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        shape = x.shape
        y = LigerRMSNormFunction.apply(x.reshape(-1, shape[-1]), weight, eps, 0.0, "llama", False)
        return y.reshape(shape)
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    if _use_liger(gate, up):
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply(gate, up)
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by cos/sin [T, D] (rotate-half convention).

    The reference computes in fp32 and casts back, as transformers' vision rotary does; for the
    text model in fp32 this is identical to transformers' in-dtype computation.
    """
    if _use_liger(q, k):
        from liger_kernel.ops.rope import LigerRopeFunction

        # Liger wants [batch, heads, seq, dim] and cos [1, seq, dim]
        q4, k4 = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0)
        qo, ko = LigerRopeFunction.apply(q4, k4, cos.unsqueeze(0), sin.unsqueeze(0))
        return qo.squeeze(0).transpose(0, 1), ko.squeeze(0).transpose(0, 1)
    cos32, sin32 = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    q32, k32 = q.float(), k.float()
    q_out = q32 * cos32 + _rotate_half(q32) * sin32
    k_out = k32 * cos32 + _rotate_half(k32) * sin32
    return q_out.to(q.dtype), k_out.to(k.dtype)
