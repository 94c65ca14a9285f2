"""The one step contract of every stage: `run(micro_batches, first_forward, loss_of) -> StepTotals`.

- `first_forward(first, k)`: the first stage's output for micro-batch k (`first` is the whole model
  without pipeline parallelism, whose output is then the final hidden states).
- `loss_of(hidden, k) -> (loss, stats)`: micro-batch k's loss from the last stage's final hidden
  states, in SUM form (not divided by the step's global count: the engine scales the gradients once,
  after the step's one reduction, see engine.py), and a dict of statistics to sum over the step.
- `StepTotals`: this rank's sums of `loss` and of each statistic, kept on the device (no host
  sync per micro-batch); only the rank holding the last stage computes them (`holds_loss`).
- `on_last_backward()`: called when this rank's backward of the step's last micro-batch starts (the
  grad buffers then reduce each bucket as soon as it is complete, overlapping the backward).
- `head_grad_fusion()`: the fused losses' keywords that add the head's weight gradient straight into
  its main gradient (Megatron's gradient-accumulation fusion): no [V, H] grad_weight is allocated.

`LocalRunner` runs the micro-batches one after the other (TP and DP still apply); `PipelineRunner`
hands them to the pipeline schedules (`lingshu_fast.parallel.pipeline`). Both pad a micro-batch to
what they run (`pad`: a multiple of TP under sequence parallelism; the pipeline's static shape) and
say how many micro-batches they run (`count`). The stage owns its loss closures (train/step.py for
stages 1-3, rl/step.py for GRPO); the runner never knows which loss it runs.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from megatron.core import parallel_state as ps

from lingshu_fast.parallel.pipeline import PipelineSchedules, microbatch_count
from lingshu_fast.parallel.relay import model_chunks
from lingshu_fast.parallel.state import ParallelDims

SEGMENT_SLOTS_PER_TOKENS = 8  # a packed sample is at least 8 tokens (chat template overhead)


class StepTotals:
    """Sums over a step's micro-batches: `loss` first, then the stage's statistics (`keys`)."""

    def __init__(self, stat_keys: Sequence[str], device, holds_loss: bool):
        self.keys = ("loss", *stat_keys)
        self.values = torch.zeros(len(self.keys), dtype=torch.float64, device=device)
        self.holds_loss = holds_loss

    def add(self, loss: torch.Tensor, stats: dict) -> None:
        if set(stats) != set(self.keys[1:]):
            raise ValueError(f"loss_of returned statistics {sorted(stats)}; the step declared {list(self.keys[1:])}")
        parts = [loss.detach().to(self.values.device, torch.float64).reshape(())]
        for key in self.keys[1:]:
            v = stats[key]
            parts.append(v.detach().to(self.values.device, torch.float64).reshape(()) if torch.is_tensor(v)
                         else torch.tensor(float(v), dtype=torch.float64, device=self.values.device))
        self.values += torch.stack(parts)


def _pad_to_multiple(mb, multiple: int, pad_token_id: int):
    extra = -mb.num_tokens % multiple
    return mb.pad_to(mb.num_tokens + extra, int(mb.cu_seqlens.numel()), pad_token_id=pad_token_id) if extra else mb


def head_grad_fusion(model, weight: torch.Tensor) -> dict:
    """`main_grad` / `on_main_grad` for the fused losses when the grad buffers gave the head weight a main
    gradient (nothing otherwise). A head tied to this stage's embedding still receives the embedding's
    gradient through autograd, whose hook then announces it: no `on_main_grad` for it."""
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None or not weight.requires_grad:
        return {}
    return dict(main_grad=main_grad, on_main_grad=None if model.lm_head_is_embedding else weight.main_grad_added)


class LocalRunner:
    """Forward/backward without pipeline parallelism (TP and DP still apply)."""

    def __init__(self, model, tp_group):
        self.model, self.tp_group = model, tp_group
        self.device = next(model.parameters()).device
        # sequence parallelism splits the token axis over TP: pad each micro-batch to a multiple of tp
        self.token_multiple = model.tp if getattr(model, "sequence_parallel", False) else 1
        self.holds_loss = True

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head_weight

    def head_grad_fusion(self) -> dict:
        return head_grad_fusion(self.model, self.lm_head_weight)

    def pad(self, mb, pad_token_id: int = 0):
        return _pad_to_multiple(mb, self.token_multiple, pad_token_id)

    def count(self, n: int) -> int:
        return n

    def run(self, micro_batches: Sequence, first_forward: Callable, loss_of: Callable,
            stat_keys: Sequence[str] = (), on_last_backward: Optional[Callable] = None) -> StepTotals:
        totals = StepTotals(stat_keys, self.device, holds_loss=True)
        for k, mb in enumerate(micro_batches):
            if mb.num_tokens == 0:
                continue  # every sample of it was dropped (e.g. an image that failed to decode)
            loss, stats = loss_of(first_forward(self.model, k), k)
            if loss.requires_grad:  # False when nothing trainable was reached (frozen LLM, no image)
                if on_last_backward is not None and k == len(micro_batches) - 1:
                    on_last_backward()
                loss.backward()
            totals.add(loss, stats)
        return totals


class PipelineRunner:
    """Micro-batches of the static shape through the pipeline schedules of this rank's chunks.

    `per_rank` (stages 1-3) fixes the micro-batch count of every step and is checked against the
    schedule here; None (stage 4) lets packing decide each update's count, rounded up by `count`
    (the caller fills the difference with empty micro-batches)."""

    def __init__(self, model, dims: ParallelDims, *, schedule: str, tokens: int, per_rank: Optional[int] = None):
        chunks = model_chunks(model)
        self.model, self.dims, self.tokens = model, dims, tokens
        self.slots = tokens // SEGMENT_SLOTS_PER_TOKENS + 2
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.schedules = PipelineSchedules(chunks, pp=dims.pp, pp_rank=dims.pp_rank,
                                           pp_group=ps.get_pipeline_model_parallel_group(), schedule=schedule,
                                           tokens=tokens)
        self.device = self.schedules.device
        self.holds_loss = bool(chunks[-1].post_process)
        self._last = chunks[-1]
        if per_rank is not None:
            self._check_count(per_rank, schedule)

    def _check_count(self, per_rank: int, schedule: str) -> None:
        pp = self.dims.pp
        if per_rank < pp and schedule == "1f1b":
            raise ValueError(f"1F1B needs at least parallel.pp={pp} micro-batches per DP rank and step; "
                             f"train.global_microbatches gives {per_rank}")
        if schedule == "interleaved" and microbatch_count(per_rank, schedule, pp) != per_rank:
            rounds = max(1, per_rank // pp)  # torch's flexible interleaved schedule runs whole rounds
            raise ValueError(f"interleaved 1F1B needs the micro-batches per DP rank ({per_rank}) to be a "
                             f"multiple of {rounds} (= their number // parallel.pp={pp})")

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self._last.lm_head_weight

    def head_grad_fusion(self) -> dict:
        return head_grad_fusion(self._last, self.lm_head_weight)

    def count(self, n: int) -> int:
        return self.schedules.count(n)

    def pad(self, mb, pad_token_id: int = 0):
        """`mb` padded to the pipeline's static shape, with a clear error when it cannot fit."""
        if mb.num_tokens > self.tokens:
            raise ValueError(f"a micro-batch of {mb.num_tokens} tokens does not fit the pipeline's static shape of "
                             f"data.max_tokens_per_microbatch={self.tokens} tokens: under parallel.pp > 1 every "
                             f"packed sequence must fit the budget (raise data.max_tokens_per_microbatch or lower "
                             f"data.max_length)")
        return mb.pad_to(self.tokens, self.slots, pad_token_id=pad_token_id)

    def run(self, micro_batches: Sequence, first_forward: Callable, loss_of: Callable,
            stat_keys: Sequence[str] = (), on_last_backward: Optional[Callable] = None) -> StepTotals:
        """`micro_batches`: padded (`pad`), on the device, as many as `count` says."""
        for mb in micro_batches:
            if mb.num_tokens != self.tokens or mb.cu_seqlens.numel() != self.slots + 1:
                raise ValueError(f"pipeline micro-batches must be padded to {self.tokens} tokens and {self.slots} "
                                 f"segments (PipelineRunner.pad); got {mb.num_tokens} tokens, "
                                 f"{mb.cu_seqlens.numel() - 1} segments")
        totals = StepTotals(stat_keys, self.device, holds_loss=self.holds_loss)

        def loss_fn(hidden: torch.Tensor, k: int) -> torch.Tensor:
            loss, stats = loss_of(hidden, k)
            totals.add(loss, stats)
            return loss

        self.schedules.step(micro_batches, first_forward, loss_fn, before_last_backward=on_last_backward)
        return totals


def build_runner(model, dims: ParallelDims, *, schedule: str, tokens: int, per_rank: Optional[int] = None):
    """The runner of this layout: a `PipelineRunner` under pipeline parallelism, else a `LocalRunner`."""
    if dims.pp > 1:
        return PipelineRunner(model, dims, schedule=schedule, tokens=tokens, per_rank=per_rank)
    return LocalRunner(model, ps.get_tensor_model_parallel_group())
