"""Sequence parallelism for the decoder (optional, `sequence_parallel=True`, TP > 1).

Between attention/MLP blocks (norms, residual stream) each TP rank holds T/tp consecutive tokens;
a column-parallel layer all-gathers its input along the sequence (backward: reduce-scatter), a
row-parallel layer reduce-scatters its output (backward: all-gather). Same communication volume as
plain TP, activations of the norms and residuals divided by tp.

Why our own autograd functions rather than Megatron-Core's `sequence_parallel=True`: its
gather/reduce-scatter buffers are allocated on `torch.cuda.current_device()`, so they cannot run
(or be tested) on CPU with gloo. These work on both; gloo has no reduce-scatter, so there it is an
all-reduce followed by taking this rank's slice.

Contract at the edges: the embedding output is scattered (`scatter_seq`), the final normed hidden
states are all-gathered (`gather_seq_output`, whose backward takes this rank's slice: the loss
hands back complete gradients, as the vocab-parallel losses all-reduce grad_hidden). Norm weights
see only local tokens, so their gradients are all-reduced over TP in backward (`sync_grad`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from lingshu_fast.parallel.relay import model_chunks


def _all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    if dist.get_backend(group) == "nccl":
        out = torch.empty((x.shape[0] * group.size(),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=0)


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    if dist.get_backend(group) == "nccl":
        out = torch.empty((x.shape[0] // group.size(),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x, group=group)
        return out
    summed = x.clone()
    dist.all_reduce(summed, group=group)
    return _local_slice(summed, group)


def _local_slice(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(group.size(), dim=0)[dist.get_rank(group)].contiguous()


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_dim0(grad, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    """Replicated -> local slice; backward all-gathers (each rank's input needs every token's grad)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _local_slice(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


class _GatherSeqOutput(torch.autograd.Function):
    """Local slice -> replicated; gradients arrive complete on every rank, so backward slices."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _local_slice(grad, ctx.group), None


class _SyncGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, group):
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def gather_seq(x, group):
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x, group):
    return _ReduceScatterSeq.apply(x, group)


def scatter_seq(x, group):
    return _ScatterSeq.apply(x, group)


def gather_seq_output(x, group):
    return _GatherSeqOutput.apply(x, group)


def sync_grad(weight, group):
    return _SyncGrad.apply(weight, group)


@contextlib.contextmanager
def without_sequence_parallel(model: torch.nn.Module):
    """Run every chunk's TP layers without sequence splitting for the duration (a decode step holds
    one token per sequence, which cannot be split over TP ranks). No-op when it is off."""
    chunks = [c for c in model_chunks(model) if getattr(c, "sequence_parallel", False)]
    linears = [m for chunk in chunks for layer in chunk.layers
               for m in (layer.qkv, layer.gate_up, layer.o_proj, layer.down_proj)]
    switched = chunks + linears + ([model] if chunks and model not in chunks else [])
    for m in switched:
        m.sequence_parallel = False
    try:
        yield
    finally:
        for m in switched:
            m.sequence_parallel = True
