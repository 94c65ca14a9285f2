"""torchrun environment -> torch.distributed -> Megatron-Core parallel_state (TP, PP, DP groups).

`init_parallel(tp, pp)` is the one entry: it reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
as torchrun sets them (a single process without them is world size 1), picks NCCL on CUDA and gloo
on CPU, and builds Megatron-Core's groups with DP = world / (TP * PP).
"""
from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LayoutError(ValueError):
    """A parallel layout this world cannot hold (one line, for the user: the CLI prints it so)."""


@dataclass(frozen=True)
class ParallelDims:
    world: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int


def _pick_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def init_parallel(tp: int = 1, pp: int = 1, backend: str = "auto", timeout_minutes: int = 30) -> ParallelDims:
    if tp > 1:
        _one_cuda_connection()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world % (tp * pp) != 0:
        raise LayoutError(
            f"world size {world} is not divisible by parallel.tp * parallel.pp = {tp} * {pp}; "
            f"choose tp and pp whose product divides {world}"
        )
    backend = _pick_backend(backend)
    if backend == "gloo" and pp > 1 and torch.cuda.is_available():
        # the model lives on the GPU (train.build.pick_device) and gloo's send/recv take CPU tensors only
        raise LayoutError("parallel.backend=gloo with parallel.pp > 1 on a CUDA machine: pipeline stages exchange "
                          "GPU tensors point to point, which gloo cannot send; use parallel.backend=nccl (or auto)")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "WORLD_SIZE" not in os.environ:
            # Not launched by torchrun: a single process still needs a store. Take a free port, and
            # ignore an inherited MASTER_PORT (a parent process may be listening on it).
            os.environ["MASTER_PORT"] = str(free_port())
        elif "MASTER_PORT" not in os.environ:
            raise RuntimeError("WORLD_SIZE is set but MASTER_PORT is not: launch with torchrun")
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes)
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        create_gloo_process_groups=(backend == "gloo"),
        distributed_timeout_minutes=timeout_minutes,
    )
    return current_dims()


def _one_cuda_connection() -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 before CUDA creates its context: with one hardware queue the
    kernels run in launch order, so a TP all-reduce issued asynchronously before the next GEMM is
    scheduled first and overlaps it (Megatron-Core's async TP communication relies on this). Set
    by torchrun users in their environment, or here for them when CUDA is still untouched."""
    if os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1":
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        warnings.warn("tensor parallelism wants CUDA_DEVICE_MAX_CONNECTIONS=1 but CUDA is already initialised; "
                      "export it before launching (torchrun ... with CUDA_DEVICE_MAX_CONNECTIONS=1)", stacklevel=3)
        return
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"


def current_dims() -> ParallelDims:
    return ParallelDims(
        world=dist.get_world_size(),
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def shutdown_parallel() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
