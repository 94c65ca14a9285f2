"""Data-parallel host reductions: a step's scalars summed (or maxed) over a group in one collective.

Gradients are not reduced here: `parallel.grad_buffer.GradBuffers` reduces (or reduce-scatters)
them bucket by bucket during the last micro-batch's backward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


def allreduce_floats(values: Sequence[float], group: Optional[dist.ProcessGroup],
                     op=dist.ReduceOp.SUM) -> list[float]:
    """Host numbers reduced over `group` in ONE collective (float64; one host sync)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [float(v) for v in values]
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()
