"""Data parallelism: gradient all-reduce over Megatron-Core's DP group.

We reduce gradients ourselves instead of wrapping the model in DDP: micro-batches differ in
content (a text-only micro-batch leaves the vision tower without gradients), and DDP would need
`find_unused_parameters`, which costs a graph walk per step. Here every rank flattens the same
parameter list in the same order, a missing gradient counts as zeros, and buckets of about
`bucket_numel` elements are all-reduced with SUM: the loss is already normalised by the global
label count of the step, so the sum over ranks is the gradient of the global loss.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

DEFAULT_BUCKET_NUMEL = 32 * 1024 * 1024


def _buckets(params: list[torch.nn.Parameter], bucket_numel: int) -> list[list[torch.nn.Parameter]]:
    out: list[list[torch.nn.Parameter]] = []
    cur: list[torch.nn.Parameter] = []
    size = 0
    for p in params:
        if cur and (size + p.numel() > bucket_numel or p.dtype != cur[0].dtype):
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += p.numel()
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def allreduce_gradients(
    params: Iterable[torch.nn.Parameter],
    group: Optional[dist.ProcessGroup],
    bucket_numel: int = DEFAULT_BUCKET_NUMEL,
) -> None:
    """Sum the gradients of `params` over `group` (no-op for a group of one)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(trainable, bucket_numel):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for p in bucket:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def allreduce_floats(values: Sequence[float], group: Optional[dist.ProcessGroup],
                     op=dist.ReduceOp.SUM) -> list[float]:
    """Host numbers reduced over `group` in ONE collective (float64; one host sync)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [float(v) for v in values]
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()
