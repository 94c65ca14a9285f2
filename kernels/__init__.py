"""Triton kernels, installed as `lingshu_fast.kernels`.

Each op lives in one file holding its Triton kernel(s), its plain-PyTorch reference and the autograd
wrapper; `LINGSHU_KERNELS=auto|triton|torch` picks the path (`_dispatch.py`). This file only
re-exports the public functions (transformers probes for a package named `kernels`: it must stay
free of side effects, see DESIGN.md).

The imports are eager on purpose: three modules share their function's name, and a lazily bound
name would be overwritten by the submodule the first time someone imports the submodule itself.
To reach a module, use `importlib.import_module("lingshu_fast.kernels.<name>")`.
"""
from lingshu_fast.kernels.fused_linear_cross_entropy import FlceOptions, fused_linear_cross_entropy
from lingshu_fast.kernels.fused_linear_grpo_loss import fused_linear_grpo_loss, token_logprobs
from lingshu_fast.kernels.grpo_advantages import grpo_advantages
from lingshu_fast.kernels.image_pack import pack_images, window_index

__all__ = [
    "FlceOptions", "fused_linear_cross_entropy", "fused_linear_grpo_loss", "grpo_advantages", "pack_images",
    "token_logprobs", "window_index",
]

if __name__ == "kernels":  # this folder imported as a TOP-LEVEL package: the repo root is on sys.path
    def __getattr__(name: str):
        if name.startswith("__"):  # probes such as getattr(module, "__version__", None) get their default
            raise AttributeError(name)
        raise ImportError(
            f"cannot import {name!r} from 'kernels': {__file__} is lingshu_fast's kernels/ folder, found as the "
            "top-level package 'kernels' because the repository root is on sys.path (python -m or torchrun -m "
            "started in the repository root), shadowing Hugging Face's `kernels` package that transformers "
            "imports. Set PYTHONSAFEPATH=1 or start from another directory.")
