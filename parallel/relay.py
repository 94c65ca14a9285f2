"""Forward-only passes through a pipeline, one stage after the other (generation, log-prob passes).

Training runs its micro-batches through torch.distributed.pipelining's schedules (pipeline.py).
Work without a backward — a decode step of the generator, the frozen reference model's log-probs —
has no micro-batches to overlap and shapes that change every call (the number of unfinished rows,
the prompt lengths), which the schedules' static buffers cannot follow. `relay` runs such a pass
stage by stage with point-to-point send/recv over Megatron-Core's pipeline group: stage s receives
stage s-1's output, runs its layers, and sends its result on to stage s+1 (a rank holds stages
c*pp + pp_rank for its chunks c = 0..V-1, as in pipeline.py, so the stages are visited in pipeline
order by every rank without a cycle). Only tensors of the one `shape` the caller names cross stage
boundaries; the last stage's result stays on the rank that holds it.

Every rank of the pipeline group must call `relay` with the same `shape` (receivers allocate it).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from megatron.core import parallel_state as ps


def _pipeline():
    """(pp size, this rank's pp rank, pp group, the group's global ranks by pp rank)."""
    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return 1, 0, None, [0]
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return 1, 0, None, [dist.get_rank()]
    group = ps.get_pipeline_model_parallel_group()
    return pp, ps.get_pipeline_model_parallel_rank(), group, dist.get_process_group_ranks(group)


def model_chunks(model: nn.Module) -> list[nn.Module]:
    """This rank's pipeline chunks in pipeline order: the chunks of a container holding them in a
    `chunks` ModuleList (the interleaved schedule's `ModelChunks`), else the model itself."""
    chunks = getattr(model, "chunks", None)
    return list(chunks) if isinstance(chunks, nn.ModuleList) else [model]


def last_stage_holder(model: nn.Module) -> bool:
    """Whether this rank holds the pipeline's last stage (the final norm and the LM head)."""
    return bool(model_chunks(model)[-1].post_process)


def relay(model: nn.Module, run_chunk: Callable[[nn.Module, Optional[torch.Tensor]], torch.Tensor],
          shape: tuple, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Run `run_chunk(chunk, previous_output_or_None)` on every pipeline stage in order.

    Stage 0 gets None; every other stage gets the previous stage's result, which must have `shape`
    and `dtype`. Returns the last stage's result on the rank that holds it, None on the others
    (without pipeline parallelism: `run_chunk(model, None)`)."""
    chunks = model_chunks(model)
    pp, pp_rank, group, ranks = _pipeline()
    if pp == 1 and len(chunks) == 1:
        return run_chunk(chunks[0], None)
    device = next(model.parameters()).device
    n_stages = pp * len(chunks)
    result = None
    for c, chunk in enumerate(chunks):
        stage = c * pp + pp_rank
        incoming = None
        if stage > 0:
            incoming = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(incoming, src=ranks[(stage - 1) % pp], group=group)
        out = run_chunk(chunk, incoming)
        if stage < n_stages - 1:
            if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
                raise ValueError(f"pipeline stage {stage} produced {tuple(out.shape)} {out.dtype} but the relay "
                                 f"carries {tuple(shape)} {dtype} between stages")
            dist.send(out.contiguous(), dst=ranks[(stage + 1) % pp], group=group)
        else:
            result = out
    return result


def broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    """Every pipeline rank gets the last stage's `tensor` (the others pass a buffer of its shape and
    dtype, overwritten in place). No-op without pipeline parallelism."""
    pp, _, group, ranks = _pipeline()
    if pp > 1:
        dist.broadcast(tensor, src=ranks[-1], group=group)
    return tensor
