"""Inputs of the fused cross-entropy tests (tests/test_fused_linear_cross_entropy.py and
tests/test_flce_three_pass.py, tests/test_flce_main_grad.py); a helper module, not collected."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def flce_inputs(n, h, v, dtype=torch.float32, ignored=(), seed=0):
    """(hidden [n, h], weight [v, h], labels [n]) with `ignored` rows set to -100; leaf tensors."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (1.5 / h**0.5)  # logits of std ~1.5, peaky softmax
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[list(ignored)] = -100
    return hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), labels


def peaky_inputs(dtype):
    """Logits of std ~6 over the first 96 ids (every label among them) and ~0 over the last 104: the tiles
    of those columns hold probabilities near e**-16, far below 2**-12, and are filtered; the others are
    kept. 40 rows cross a row stripe."""
    hidden, weight, labels = flce_inputs(40, 32, 200, ignored=(5,), seed=7)
    weight = weight.detach() * 4
    weight[96:] *= 0.02
    labels = torch.where(labels >= 0, labels % 96, labels)
    return hidden.detach().to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), labels


class AllocationLog(TorchDispatchMode):
    """Shape and dtype of every tensor an aten op returns in NEW storage (views, and the interpreter's
    re-wrapping of an input's storage, share it: skipped)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        owned = {a.untyped_storage().data_ptr() for a in (*args, *(kwargs or {}).values())
                 if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in owned:
                self.seen.append((func.__name__, tuple(t.shape), t.dtype))
        return out
