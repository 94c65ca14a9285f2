"""The one attention dispatch: packed variable-length attention over `cu_seqlens`, no padding.

`varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal)` takes q [T, Hq, D], k/v [T, Hkv, D]
(GQA when Hq > Hkv) and returns [T, Hq, D]; tokens attend only inside their segment
[cu_seqlens[i], cu_seqlens[i+1]). The LLM calls it causal over packed samples, the ViT
bidirectional over images or windows.

Backends, chosen by `backend="auto"` (or `model.attention` in the config):
- "flash": flash-attn's `flash_attn_varlen_func` (CUDA, if installed);
- "varlen": `torch.nn.attention.varlen.varlen_attn` (CUDA only, flash under the hood);
- "sdpa": `scaled_dot_product_attention` per segment: the CPU path, exact in fp32, and the CUDA
  fallback. One SDPA call per segment costs a Python loop over segments; fine for tests and the
  demo, and the GPU path normally takes one of the fused kernels above.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_BACKENDS = ("auto", "flash", "varlen", "sdpa")


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _torch_varlen_func():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """The backend that `backend` means on `device`; ValueError when it cannot run there.
    "auto" picks a flash kernel only for 16-bit inputs (they have no fp32 path)."""
    if backend not in _BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {_BACKENDS}")
    on_cuda = device.type == "cuda"
    if backend == "auto":
        half = dtype in (torch.float16, torch.bfloat16)
        if on_cuda and half and _flash_attn_func() is not None:
            return "flash"
        if on_cuda and half and _torch_varlen_func() is not None:
            return "varlen"
        return "sdpa"
    if backend in ("flash", "varlen") and not on_cuda:
        raise ValueError(f"attention backend {backend!r} needs CUDA tensors; use 'sdpa' or 'auto' on CPU")
    if backend == "flash" and _flash_attn_func() is None:
        raise ValueError("attention backend 'flash' needs the flash-attn package (pip install flash-attn)")
    if backend == "varlen" and _torch_varlen_func() is None:
        raise ValueError("attention backend 'varlen' needs torch.nn.attention.varlen (torch >= 2.10)")
    return backend


def _sdpa_segments(q, k, v, cu_seqlens, causal: bool, scale: float) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    bounds = cu_seqlens.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [1, heads, seq, dim] per segment
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa)
        outputs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outputs, dim=0)


def _torch_varlen(q, k, v, cu, max_seqlen: int, causal: bool, scale: float) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn across torch versions: causal masking is
    `window_size=(-1, 0)` from torch 2.11 and `is_causal` in 2.10; GQA is `enable_gqa` where it
    exists, else K/V heads are repeated."""
    import inspect

    func = _torch_varlen_func()
    params = inspect.signature(func).parameters
    kwargs = {"scale": scale} if "scale" in params else {}  # the default is the same 1/sqrt(head_dim)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    return func(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_seqlen, max_seqlen, **kwargs)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    backend: str = "auto",
) -> torch.Tensor:
    # checked on CPU only: on CUDA the .item() would sync the stream every layer
    if cu_seqlens.device.type == "cpu" and int(cu_seqlens[-1]) != q.shape[0]:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but there are {q.shape[0]} tokens")
    scale = q.shape[-1] ** -0.5
    chosen = resolve_backend(backend, q.device, q.dtype)
    if chosen == "flash":
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return _flash_attn_func()(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal)
    if chosen == "varlen":
        return _torch_varlen(q, k, v, cu_seqlens.to(device=q.device, dtype=torch.int32), max_seqlen, causal, scale)
    return _sdpa_segments(q, k, v, cu_seqlens, causal, scale)
