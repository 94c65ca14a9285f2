"""Activation checkpointing policies: which activations a layer keeps for backward and which it recomputes.

`model.activation_checkpointing`:
- `none`: every layer keeps what autograd saves.
- `full`: a layer keeps only its input; its whole forward runs again in backward (torch's non-reentrant
  checkpoint). About one extra forward of the layers.
- `selective`: as Megatron-Core's selective recompute, only cheap-to-recompute, memory-heavy pieces:
  the ATTENTION CORE (rotary + varlen attention: it keeps the fused qkv projection instead of the
  rotated q/k, the attention output copies and the log-sum-exp) and the MLP ACTIVATION (silu(gate) * up:
  neither its intermediate nor its output is kept; the output, which the down projection needs for its
  weight gradient, is recomputed from gate/up when that backward runs, as Megatron's
  `CheckpointWithoutOutput` does for its activation recompute). No matmul runs twice except the
  attention's own.
`model.checkpoint_every_k_layers = k`: the policy applies to decoder layers (by global index, so the
choice does not depend on the pipeline layout) and ViT blocks whose index is a multiple of k; the
others keep everything. k = 1: all of them.

How the MLP activation's output is dropped: while the consumer (the down projection) runs, a
saved-tensor hook swaps any saved tensor that lives in the activation output's storage for a small
record (the inputs and the view's geometry); unpacking it recomputes the activation under no_grad.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch.utils.checkpoint import checkpoint

POLICIES = ("none", "full", "selective")


def normalize_policy(policy: Union[str, bool, None]) -> str:
    """A policy name from a name or the old boolean switch (True: full, False/None: none)."""
    if policy is None or policy is False:
        return "none"
    if policy is True:
        return "full"
    if policy not in POLICIES:
        raise ValueError(f"activation checkpointing policy {policy!r} is not one of {', '.join(POLICIES)}")
    return policy


def layer_policy(policy: str, index: int, every_k: int) -> str:
    """The policy of layer/block `index` under `checkpoint_every_k_layers = every_k`."""
    if every_k < 1:
        raise ValueError(f"checkpoint_every_k_layers={every_k} must be >= 1")
    return policy if index % every_k == 0 else "none"


def maybe_checkpoint(fn: Callable, *args, active: bool):
    """`fn(*args)`, recomputed in backward when `active` and autograd is recording."""
    if active and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class _Recomputed:
    """A saved tensor that was dropped: enough to rebuild it (the view's geometry in the output)."""

    __slots__ = ("size", "stride", "offset")

    def __init__(self, t: torch.Tensor):
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


def activation_then(activation: Callable, inputs: Sequence[torch.Tensor], consumer: Callable) -> torch.Tensor:
    """`consumer(activation(*inputs))` keeping only `inputs` for backward (selective recompute).

    The activation runs under checkpoint (its own saved intermediates are dropped); whatever the
    consumer saves of the activation's output (a matmul's input, or a view of it) is replaced by a
    record and recomputed from `inputs` when the consumer's backward unpacks it."""
    if not torch.is_grad_enabled():
        return consumer(activation(*inputs))
    out = checkpoint(activation, *inputs, use_reentrant=False)
    storage = out.untyped_storage()
    out_ptr, out_device = storage.data_ptr(), out.device

    def pack(t: torch.Tensor):
        if t.device == out_device and t.untyped_storage().data_ptr() == out_ptr and out_ptr != 0:
            return _Recomputed(t)
        return t

    def unpack(saved):
        if not isinstance(saved, _Recomputed):
            return saved
        with torch.no_grad():
            full = activation(*inputs)
        return full.as_strided(saved.size, saved.stride, saved.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return consumer(out)
