"""One optimizer step for every stage: run -> reduce gradients -> ONE reduction of the step's scalars
-> scale and clip -> finite check -> optimizer -> schedule.

The stage gives the runner its micro-batches and loss closures (runner.py) and two kinds of
numbers: its share of the loss normaliser (`count`: label tokens in stages 1-3, masked tokens or
sequences in GRPO) and host-side figures to sum over data-parallel ranks (tokens, FLOPs, ...).

One collective, one host sync. Everything the step needs to know globally goes into one float64
vector all-reduced over the whole world: the count and host figures (contributed once per DP
replica, by its first tensor- and pipeline-parallel rank), the loss and the stage's statistics
(by the first TP rank of the last pipeline stage, which computed them), and the squared gradient
norm (Megatron's counting rule within a replica: TP-sharded parameters on every TP rank,
replicated ones on TP rank 0, `shared` ones nowhere else; over the shards of every DP rank under the
distributed optimizer, else by the first DP replica, whose gradients equal the others' after the
all-reduce). The vector's one `tolist()` is the step's host sync.

Gradients accumulate in fp32 main-gradient buffers whose data-parallel reduction starts during the
last micro-batch's backward (`parallel.grad_buffer`); the optimizer steps fp32 main parameters.

Normalisation. Losses arrive as sums, so gradients are those of the sum; with N the global count,
the step's loss is sum / N and the gradient norm |g| / N, and the gradients are scaled once by
min(1, clip / (|g| / N)) / N before the optimizer (no separate clip pass). A step whose loss or
norm is not finite is skipped (`SkipTracker`); a step with N = 0 (an RL update whose groups were
all filtered) makes no update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from lingshu_fast.parallel.state import ParallelDims
from lingshu_fast.train.metrics import SkipTracker
from lingshu_fast.train.optim import current_lrs, grad_norm_squared


@dataclass
class StepResult:
    loss: float  # the step's loss: global sum / global count
    grad_norm: float  # of the normalised gradient, before clipping
    count: float  # the global normaliser
    updated: bool  # the optimizer stepped
    lrs: dict[str, float]  # the learning rates this step used, by module group
    stats: dict[str, float] = field(default_factory=dict)  # global sums of the stage's statistics
    host: dict[str, float] = field(default_factory=dict)  # global sums of the host figures


class StepEngine:
    def __init__(self, model, optimizer, scheduler, runner, dims: ParallelDims, *, grad_clip: float,
                 skips: SkipTracker):
        self.model, self.optimizer, self.scheduler, self.runner = model, optimizer, scheduler, runner
        self.dims, self.grad_clip, self.skips = dims, float(grad_clip), skips
        self.dp_group = ps.get_data_parallel_group() if dims.dp > 1 else None
        self.host_syncs = 0  # device -> host copies the engine made (one per step)

    def step(self, micro_batches: Sequence, first_forward: Callable, loss_of: Callable, *, count: float,
             host: Optional[dict[str, float]] = None, stat_keys: Sequence[str] = (), step: int = 0) -> StepResult:
        host = dict(host or {})
        buffers = self.optimizer.buffers
        buffers.zero()
        totals = self.runner.run(micro_batches, first_forward, loss_of, stat_keys=stat_keys,
                                 on_last_backward=buffers.start_last_backward)
        buffers.finish()
        norm_sq = grad_norm_squared(self.optimizer, tp_rank=self.dims.tp_rank)
        reduced = self._reduce_scalars(count, host, totals, norm_sq)
        global_count = reduced["count"]
        scale = 1.0 / max(global_count, 1.0)
        loss = reduced["loss"] * scale
        grad_norm = math.sqrt(max(reduced["norm_sq"], 0.0)) * scale if math.isfinite(reduced["norm_sq"]) \
            else reduced["norm_sq"]
        lrs = current_lrs(self.optimizer)
        updated = False
        if global_count == 0:
            self.skips.ok()  # nothing to learn from (every RL group filtered or empty): no update
        elif math.isfinite(loss) and math.isfinite(grad_norm):
            clip = min(1.0, self.grad_clip / (grad_norm + 1e-6)) if self.grad_clip > 0 else 1.0
            buffers.scale_(scale * clip)
            self.optimizer.step()
            updated = True
            self.skips.ok()
        else:
            self.skips.skip(step, f"loss={loss}, grad_norm={grad_norm}")
        self.scheduler.step()
        stats = {k: reduced[k] for k in totals.keys[1:]}
        return StepResult(loss=loss, grad_norm=grad_norm, count=global_count, updated=updated, lrs=lrs,
                          stats=stats, host={k: reduced[k] for k in host})

    def _reduce_scalars(self, count: float, host: dict, totals, norm_sq: torch.Tensor) -> dict[str, float]:
        dims = self.dims
        replica_first = dims.tp_rank == 0 and dims.pp_rank == 0
        loss_holder = dims.tp_rank == 0 and totals.holds_loss
        device = _collective_device(totals.values.device)
        host_part = torch.tensor([float(count), *map(float, host.values())], dtype=torch.float64, device=device)
        # each DP rank holds a shard of the reduced gradients under the distributed optimizer, all of them otherwise
        norm_holder = self.optimizer.buffers.shard or dims.dp_rank == 0
        vector = torch.cat([host_part * float(replica_first),
                            totals.values.to(device) * float(loss_holder),
                            norm_sq.to(device, torch.float64).reshape(1) * float(norm_holder)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vector)
        values = vector.tolist()  # the step's one host sync
        self.host_syncs += 1
        keys = ["count", *host, *totals.keys, "norm_sq"]
        return dict(zip(keys, values))


def _collective_device(device: torch.device) -> torch.device:
    """NCCL reduces CUDA tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
