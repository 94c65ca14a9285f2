"""The one switch between Triton kernels and their plain-PyTorch references.

`LINGSHU_KERNELS=auto|triton|torch` (default auto):
- auto: Triton on CUDA tensors, the reference otherwise (CPU, tests, the demo);
- triton: always Triton (on CPU tensors this needs `TRITON_INTERPRET=1`, as the tests set);
- torch: always the reference.
Every public op asks `use_triton(...)` once, at its entry, and nowhere else.
"""
from __future__ import annotations

import os

import torch

_CHOICES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    mode = os.environ.get("LINGSHU_KERNELS", "auto").strip().lower()
    if mode not in _CHOICES:
        raise ValueError(f"LINGSHU_KERNELS={mode!r} is not one of {', '.join(_CHOICES)}")
    return mode


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should run its Triton kernel on these tensors."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if mode == "auto":
        return on_cuda
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "LINGSHU_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)"
        )
    return True
