"""Pipeline schedules: torch.distributed.pipelining over Megatron-Core's PP group (mechanics only).

What the trainer gives: this rank's model chunks (chunk c is stage c*pp + pp_rank of pp*V), the
static token budget of a micro-batch, and per call `first_forward(chunk, k)` (stage 0's output for
micro-batch k) and `loss_fn(hidden, k)` (the last stage's loss of micro-batch k, what its backward
starts from). What it does not know: configs, the model class, losses. The trainer's runner
(`lingshu_fast.train.runner.PipelineRunner`) adapts it to the one step contract.

Shapes. The schedules' receive buffers have fixed shapes, so every micro-batch is padded to the
token budget with the tail as its own segment, and `cu_seqlens` to a fixed number of slots (the
caller does that). Only `hidden [T, H]` (or `[T/tp, H]` under sequence parallelism) crosses a stage
boundary: every rank of a pipeline loads the same micro-batches (same DP rank), and the schedules
(GPipe, 1F1B, interleaved) run each stage's forwards in micro-batch order, so a stage reads the
positions and segment boundaries of its k-th forward from the caller's list (`current`). Passing
the integer tensors through the schedule deadlocks 1F1B on gloo: their gradient sends and receives
do not pair up. Stage metadata is static (from these fixed shapes), never inferred by a trial
forward (in dynamic mode torch runs the stage on uninitialised buffers, and varlen attention rightly
rejects garbage `cu_seqlens`).

Inputs of the first stage: images differ in size from one micro-batch to the next, so they do not
go through the schedule's input splitting: the first stage receives only the micro-batch's index.
The schedule's target is the index too (`scale_grads=False`: the caller normalises).

Tied embeddings (PP > 1) are the grad buffers' business (`lingshu_fast.train.layout.mark_tied_copies`).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

# RL updates vary their micro-batch count. Each schedule's stages hold receive buffers for all of its
# micro-batches (activations and gradients: ~2 x count x [tokens/tp, H] per chunk, ~0.1 GB each for
# a 7B model at 16k tokens), so an idle cached schedule costs GBs while rebuilding one costs only
# the construction of its PipelineStage objects (static shapes, no communication): keep two.
MAX_CACHED_SCHEDULES = 2
SCHEDULES = ("1f1b", "gpipe", "interleaved")


def microbatch_count(n: int, schedule: str, pp: int) -> int:
    """The smallest micro-batch count >= n that `schedule` runs: 1F1B needs one per stage at least,
    interleaved 1F1B whole rounds (a multiple of max(1, count // pp))."""
    n = max(n, 1)
    if schedule == "1f1b":
        return max(n, pp)
    if schedule == "interleaved":
        while n % max(1, n // pp):
            n += 1
    return n


class _StageModule(nn.Module):
    """Adapts a model chunk to the schedule's positional tensor interface: the first stage takes a
    micro-batch index and runs the caller's `first_forward`, the others the previous stage's hidden
    states with the micro-batch's positions and boundaries read from the caller's list."""

    def __init__(self, chunk, schedules: "PipelineSchedules", index: int):
        super().__init__()
        self.chunk, self.schedules, self.index = chunk, schedules, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.schedules.next_forward_index(self.index)
        if self.chunk.pre_process:
            out = self.schedules.first_forward(self.chunk, k)
        else:
            mb = self.schedules.current[k]
            out = self.chunk(hidden_states=x, position_ids=mb.position_ids, cu_seqlens=mb.cu_seqlens,
                             max_seqlen=mb.max_seqlen).hidden_states
        if not self.chunk.post_process:  # the last stage's backward starts at its loss (`_loss`)
            self.schedules.hook_last_backward(out, k)
        return out


class PipelineSchedules:
    """torch pipeline schedules over this rank's `chunks`, built per micro-batch count and cached
    (the MAX_CACHED_SCHEDULES most recent: a stage's buffers are sized for one count).

    `chunks[c]` must expose `pre_process`, `post_process`, `config.text_config.hidden_size`, `dtype`,
    `tp` and `sequence_parallel`."""

    def __init__(self, chunks: Sequence[nn.Module], *, pp: int, pp_rank: int, pp_group, schedule: str,
                 tokens: int):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        self.chunks, self.pp, self.pp_rank, self.pp_group = list(chunks), pp, pp_rank, pp_group
        self.schedule_name, self.tokens = schedule, tokens
        self.first, self.last = self.chunks[0], self.chunks[-1]
        self.device = next(self.first.parameters()).device
        self.current: list = []
        self.first_forward = None
        self.before_last_backward = None
        self._loss_fn = None
        self._forwards = [0] * len(self.chunks)
        self._cache: dict = {}
        for chunk in self.chunks:
            self._static_shapes(chunk)  # a budget that sequence parallelism cannot split fails here

    def count(self, n: int) -> int:
        return microbatch_count(n, self.schedule_name, self.pp)

    def _build(self, n: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        if n in self._cache:
            self._cache[n] = self._cache.pop(n)  # most recently used last
            return self._cache[n]
        if len(self._cache) >= MAX_CACHED_SCHEDULES:
            self._cache.pop(next(iter(self._cache)))
        n_stages = self.pp * len(self.chunks)
        stages = [PipelineStage(_StageModule(chunk, self, c), c * self.pp + self.pp_rank, n_stages, self.device,
                                group=self.pp_group, **self._static_shapes(chunk))
                  for c, chunk in enumerate(self.chunks)]
        # every stage gets the loss function: the schedule runs backward only where one is given
        if self.schedule_name == "interleaved":
            schedule = ScheduleInterleaved1F1B(stages, n, loss_fn=self._loss, scale_grads=False)
        else:
            schedule_cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[self.schedule_name]
            schedule = schedule_cls(stages[0], n, loss_fn=self._loss, scale_grads=False)
        self._cache[n] = schedule
        return schedule

    def _static_shapes(self, chunk) -> dict:
        """Example tensors of each stage's inputs and outputs (static metadata, see the docstring)."""
        if chunk.sequence_parallel and self.tokens % chunk.tp:
            raise ValueError(f"data.max_tokens_per_microbatch={self.tokens} must be a multiple of parallel.tp="
                             f"{chunk.tp} under sequence parallelism")
        local_tokens = self.tokens // chunk.tp if chunk.sequence_parallel else self.tokens
        hidden = torch.zeros(local_tokens, chunk.config.text_config.hidden_size, dtype=chunk.dtype,
                             device=self.device, requires_grad=True)  # requires_grad: gradients flow back
        inputs = torch.zeros(1, 1, dtype=torch.int64, device=self.device) if chunk.pre_process else hidden
        # the last stage gathers the sequence-parallel shards back to the full [T, H] for the loss
        output = torch.zeros(self.tokens, hidden.shape[1], dtype=chunk.dtype, device=self.device,
                             requires_grad=True) if chunk.post_process else hidden
        return {"input_args": (inputs,), "output_args": (output,)}

    def next_forward_index(self, chunk_index: int) -> int:
        k = self._forwards[chunk_index]
        self._forwards[chunk_index] += 1
        return k

    def hook_last_backward(self, t: torch.Tensor, k: int) -> None:
        """Call `before_last_backward` when the gradient of micro-batch k's `t` (the stage output, or the
        last stage's loss: the first tensor its backward reaches) arrives, if k is the step's last."""
        hook = self.before_last_backward
        if hook is not None and k == len(self.current) - 1 and t.requires_grad:
            t.register_hook(lambda grad: (hook(), grad)[1])

    def _loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = int(target.reshape(-1)[0])  # the target is the micro-batch's index
        loss = self._loss_fn(hidden, k)
        # at the loss, not at `hidden`: the loss's own backward (the LM head's, whose gradient is the first
        # to reach the grad buffers) runs before the gradient of `hidden` exists
        self.hook_last_backward(loss, k)
        return loss

    def step(self, microbatches: Sequence, first_forward: Callable, loss_fn: Callable,
             before_last_backward: Optional[Callable] = None) -> None:
        """Forward and backward of `microbatches` (padded to the static shape, on the device; their
        count one the schedule runs: `count`). `before_last_backward()` is called when this rank's
        backward of the last micro-batch starts (one chunk per rank only: with several, their last
        backwards interleave with other micro-batches' and no single moment is 'the last')."""
        n = len(microbatches)
        if n != self.count(n):
            raise ValueError(f"the {self.schedule_name} schedule over {self.pp} stages cannot run {n} micro-batches; "
                             f"pad to {self.count(n)}")
        schedule = self._build(n)
        self.current, self.first_forward, self._loss_fn = list(microbatches), first_forward, loss_fn
        self.before_last_backward = before_last_backward if len(self.chunks) == 1 else None
        self._forwards = [0] * len(self.chunks)
        args = (torch.arange(n, device=self.device).reshape(n, 1),) if self.first.pre_process else ()
        target = torch.arange(n).reshape(n, 1) if self.last.post_process else None
        try:
            schedule.step(*args, target=target, losses=[], return_outputs=False)
        finally:
            self.current, self.first_forward, self._loss_fn, self.before_last_backward = [], None, None, None
