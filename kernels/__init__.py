"""Triton kernels, installed as `lingshu_fast.kernels`.

Each op lives in one file holding its Triton kernel(s), its plain-PyTorch reference and the autograd
wrapper; `LINGSHU_KERNELS=auto|triton|torch` picks the path (`_dispatch.py`). This file only
re-exports, lazily: importing it has no side effects and does not import triton (transformers
probes for a package named `kernels`, see DESIGN.md).
"""
from importlib import import_module

_EXPORTS = {
    "fused_linear_cross_entropy": "fused_linear_cross_entropy",
    "grpo_advantages": "grpo_advantages",
    "fused_linear_grpo_loss": "fused_linear_grpo_loss",
    "token_logprobs": "fused_linear_grpo_loss",
    "pack_images": "image_pack",
    "window_index": "image_pack",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lingshu_fast.kernels' has no attribute {name!r}")
    value = getattr(import_module(f"lingshu_fast.kernels.{module}"), name)
    globals()[name] = value
    return value
