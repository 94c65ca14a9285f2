"""Pipeline parallelism: torch.distributed.pipelining schedules over Megatron-Core's PP group.

Layout. Stage s holds decoder layers [start_s, end_s); the first stage also holds the vision tower
and the embeddings, the last the final norm and the LM head. `stage_layer_range` balances the
stages by the model's FLOP estimate (`lingshu_fast.model.flops.pipeline_layer_split`), in which the
first stage pays for the ViT on a representative image load and the last for the LM head.

Interleaved 1F1B (`parallel.pp_schedule=interleaved`, `parallel.virtual_stages=V`). The layers are
split into pp*V stages; rank r holds the V chunks s = c*pp + r (c = 0..V-1), each its own
`Qwen25VLModel`, gathered in a `ModelChunks` module that the loop, the checkpoints and the export
treat as the rank's model. Stage 0 (chunk 0 of rank 0) holds the ViT and embeddings, stage pp*V-1
(chunk V-1 of the last rank) the norm and LM head, so Megatron's embedding group (first and last PP
rank) still pairs the two copies of a tied embedding.

Shapes. The schedules' receive buffers have fixed shapes, so every micro-batch is padded to the
token budget (`data.max_tokens_per_microbatch`) with the tail as its own segment (labels -100),
and `cu_seqlens` to a fixed number of slots (`MicroBatch.pad_to`). Only `hidden [T, H]` crosses a
stage boundary: every rank of a pipeline loads the same micro-batches (same DP rank), and the
schedules (GPipe, 1F1B, interleaved) run each stage's forwards in micro-batch order, so a stage
(a chunk, with several per rank) reads the positions and segment boundaries of its k-th forward from
its own copy. (Passing the
integer tensors through the schedule deadlocks 1F1B on gloo: their gradient sends and receives do
not pair up.)

Stage metadata is static (from these fixed shapes), never inferred by a trial forward.

Inputs of the first stage. Images differ in size from one micro-batch to the next, so they do not
go through the schedule's input splitting: the first stage receives only the micro-batch's index
and runs the caller's `first_forward(chunk, index)` (stages 1-3: ids, positions, pixels; stage 4:
each prompt's images encoded once and shared by its group). The schedule's target is the index
too: the last stage's `loss_of(hidden, index)` reads that micro-batch's labels (stages 1-3:
`sum CE / global_label_tokens`, as the non-pipelined step) or its advantages, mask and log-probs
(stage 4's GRPO loss), with `scale_grads=False`.

Tied embeddings (PP > 1). The last stage keeps its own copy of the embedding as LM head; their
gradients are summed over Megatron-Core's embedding group after the backward so both copies take
the same update, and the copy on the last stage is marked `shared` so the gradient norm counts it
once.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

SEGMENT_SLOTS_PER_TOKENS = 8  # a packed sample is at least 8 tokens (chat template overhead)


def check_schedule(parallel) -> int:
    """The number of chunks per rank (`parallel.virtual_stages`), checked against the schedule."""
    from lingshu_fast.config import ConfigError

    v, schedule = parallel.virtual_stages, parallel.pp_schedule
    if v < 1:
        raise ConfigError(f"parallel.virtual_stages={v} must be >= 1")
    if schedule == "interleaved" and v < 2:
        raise ConfigError("parallel.pp_schedule=interleaved needs parallel.virtual_stages >= 2 (chunks per rank)")
    if schedule != "interleaved" and v > 1:
        raise ConfigError(f"parallel.virtual_stages={v} needs parallel.pp_schedule=interleaved "
                          f"({schedule} runs one stage per rank)")
    return v


def stage_layer_ranges(hf_config, pp: int, pp_rank: int, tokens_per_microbatch: int,
                       virtual_stages: int = 1) -> list[tuple[int, int]]:
    """Decoder layers [start, end) of each chunk of pipeline rank `pp_rank` (chunk c is stage
    c*pp + pp_rank of pp*virtual_stages), for micro-batches of `tokens_per_microbatch` tokens of
    which a quarter are image tokens (4 ViT patches each): a typical multimodal mix."""
    from lingshu_fast.config import ConfigError
    from lingshu_fast.model.flops import pipeline_layer_split

    stages, layers = pp * virtual_stages, hf_config.text_config.num_hidden_layers
    if stages > layers:
        raise ConfigError(f"parallel.pp={pp} x parallel.virtual_stages={virtual_stages} = {stages} pipeline stages "
                          f"but the model has {layers} decoder layers (one at least per stage)")
    split = pipeline_layer_split(hf_config, stages, seq_len=tokens_per_microbatch,
                                 image_patches=tokens_per_microbatch)
    return [split[chunk * pp + pp_rank] for chunk in range(virtual_stages)]


def rank_layer_kwargs(hf_config, dims, cfg) -> list[dict]:
    """`layer_start`/`layer_end` keyword sets of this rank's model chunks ([{}]: the whole model)."""
    if dims.pp == 1:
        return [{}]
    ranges = stage_layer_ranges(hf_config, dims.pp, dims.pp_rank, cfg.data.max_tokens_per_microbatch,
                                check_schedule(cfg.parallel))
    return [{"layer_start": start, "layer_end": end} for start, end in ranges]


def rank_model(chunks: list) -> nn.Module:
    """The rank's model: the one chunk itself, or several in a `ModelChunks`."""
    return chunks[0] if len(chunks) == 1 else ModelChunks(chunks)


class ModelChunks(nn.Module):
    """A rank's virtual pipeline stages under the interleaved schedule (chunk c = stage c*pp+pp_rank).

    state_dict / parameters are nn.ModuleList's (`chunks.<c>.<name>`): checkpoints resume on the
    same layout. `param_groups` / `set_trainable` apply the model's grouping to each chunk."""

    def __init__(self, chunks: list):
        super().__init__()
        self.chunks = nn.ModuleList(chunks)
        first = chunks[0]
        self.config, self.dtype, self.tp, self.tied = first.config, first.dtype, first.tp, first.tied
        self.sequence_parallel = first.sequence_parallel

    @property
    def pre_process(self) -> bool:
        return self.chunks[0].pre_process

    @property
    def post_process(self) -> bool:
        return self.chunks[-1].post_process

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.chunks[-1].lm_head_weight

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        from lingshu_fast.model import param_groups

        merged: dict[str, list[nn.Parameter]] = {}
        for chunk in self.chunks:
            for group, params in param_groups(chunk).items():
                merged.setdefault(group, []).extend(params)
        return merged

    def set_trainable(self, groups_frozen: list[str]) -> None:
        from lingshu_fast.model import set_trainable

        for chunk in self.chunks:
            set_trainable(chunk, groups_frozen)

    def forward(self, *args, **kwargs):
        raise RuntimeError("ModelChunks runs only through PipelineRunner (its chunks are pipeline stages)")


class _StageModule(nn.Module):
    """Adapts the model slice to the schedule's positional tensor interface: the first stage takes
    a micro-batch index and runs the runner's `first_forward`, the others the previous stage's
    hidden states; every stage reads the micro-batch's positions and boundaries from the runner."""

    def __init__(self, model, runner: "PipelineRunner", chunk: int):
        super().__init__()
        self.model, self.runner, self.chunk = model, runner, chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.runner.next_forward_index(self.chunk)
        if self.model.pre_process:
            return self.runner.first_forward(self.model, k)
        mb = self.runner.current[k]
        return self.model(hidden_states=x, position_ids=mb.position_ids, cu_seqlens=mb.cu_seqlens,
                          max_seqlen=mb.max_seqlen).hidden_states


# RL updates vary their micro-batch count. Each schedule's stages hold receive buffers for all of its
# micro-batches (activations and gradients: ~2 x count x [tokens/tp, H] per chunk, ~0.1 GB each for
# a 7B model at 16k tokens), so an idle cached schedule costs GBs while rebuilding one costs only
# the construction of its PipelineStage objects (static shapes, no communication): keep two.
MAX_CACHED_SCHEDULES = 2


class PipelineRunner:
    """Runs micro-batches of the static shape through torch's pipeline schedule.

    `forward_backward` is stages 1-3's step (cross-entropy over the labels). `run` is the general
    form stage 4 uses: a first-stage forward and a per-micro-batch loss given by the caller.

    The schedules fix their micro-batch count when built. Stages 1-3 always run
    `train.global_microbatches / dp` per step (one schedule, checked here). With
    `variable_microbatches=True` (stage 4: packing decides the count of each update) a schedule
    is built per count on first use and kept (the MAX_CACHED_SCHEDULES most recent; fresh
    `PipelineStage`s each: a stage's buffers are sized for one count), and `microbatch_count(n)` rounds n up to a count the schedule accepts;
    the caller fills the difference with empty micro-batches (nothing trained). Padding every
    update to one fixed count instead would run the pipeline on empty micro-batches whenever an
    update packs into fewer than the worst case (one sequence per micro-batch)."""

    def __init__(self, model, dims, cfg, opts=None, *, variable_microbatches: bool = False):
        from megatron.core import parallel_state as ps

        from lingshu_fast.train.step import LossOptions

        n_chunks = check_schedule(cfg.parallel)
        self.chunks = list(model.chunks) if isinstance(model, ModelChunks) else [model]
        if len(self.chunks) != n_chunks:
            raise ValueError(f"the model has {len(self.chunks)} chunks but parallel.virtual_stages={n_chunks}")
        self.first, self.last = self.chunks[0], self.chunks[-1]
        self.model, self.dims, self.opts = model, dims, opts if opts is not None else LossOptions()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.tokens = cfg.data.max_tokens_per_microbatch
        self.slots = self.tokens // SEGMENT_SLOTS_PER_TOKENS + 2
        self.schedule_name = cfg.parallel.pp_schedule
        self.device = next(model.parameters()).device
        self.current: list = []
        self.first_forward = None  # (first chunk, micro-batch index) -> hidden states, set by `run`
        self._loss_of = None  # (last stage's hidden, micro-batch index) -> loss, set by `run`
        self._forwards = [0] * n_chunks
        self._schedules: dict = {}
        self.tied = bool(model.config.tie_word_embeddings)
        if self.tied and self.last.post_process and not self.last.pre_process:
            self.last.lm_head.weight.shared = True
        for chunk in self.chunks:
            self._static_shapes(chunk)  # a budget that sequence parallelism cannot split fails here
        self.per_rank = None
        if not variable_microbatches:
            self.per_rank = cfg.train.global_microbatches // dims.dp
            if self.per_rank < dims.pp and self.schedule_name == "1f1b":
                raise ValueError(f"1F1B needs at least parallel.pp={dims.pp} micro-batches per DP rank and step; "
                                 f"train.global_microbatches={cfg.train.global_microbatches} gives {self.per_rank}")
            if self.schedule_name == "interleaved" and self.microbatch_count(self.per_rank) != self.per_rank:
                rounds = max(1, self.per_rank // dims.pp)  # torch's flexible interleaved schedule runs whole rounds
                raise ValueError(f"interleaved 1F1B needs the micro-batches per DP rank ({self.per_rank}) to be a "
                                 f"multiple of {rounds} (= their number // parallel.pp={dims.pp})")
            self._schedule(self.per_rank)

    def microbatch_count(self, n: int) -> int:
        """The smallest micro-batch count >= n that the schedule runs: 1F1B needs one per stage at
        least, interleaved 1F1B whole rounds (a multiple of max(1, count // pp))."""
        n, pp = max(n, 1), self.dims.pp
        if self.schedule_name == "1f1b":
            return max(n, pp)
        if self.schedule_name == "interleaved":
            while n % max(1, n // pp):
                n += 1
        return n

    def _schedule(self, n: int):
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                  ScheduleInterleaved1F1B)

        if n in self._schedules:
            self._schedules[n] = self._schedules.pop(n)  # most recently used last
            return self._schedules[n]
        if len(self._schedules) >= MAX_CACHED_SCHEDULES:
            self._schedules.pop(next(iter(self._schedules)))
        dims = self.dims
        stages = [PipelineStage(_StageModule(chunk, self, c), c * dims.pp + dims.pp_rank, dims.pp * len(self.chunks),
                                self.device, group=self.pp_group, **self._static_shapes(chunk))
                  for c, chunk in enumerate(self.chunks)]
        # every stage gets the loss function: the schedule runs backward only where one is given
        if self.schedule_name == "interleaved":
            schedule = ScheduleInterleaved1F1B(stages, n, loss_fn=self._loss, scale_grads=False)
        else:
            schedule_cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[self.schedule_name]
            schedule = schedule_cls(stages[0], n, loss_fn=self._loss, scale_grads=False)
        self._schedules[n] = schedule
        return schedule

    def _static_shapes(self, model) -> dict:
        """Example tensors of each stage's inputs and outputs. Static metadata matters: in dynamic
        mode torch.distributed.pipelining first runs the stage on uninitialised buffers to infer
        its output, and our varlen attention rightly rejects garbage `cu_seqlens`."""
        if model.sequence_parallel and self.tokens % model.tp:
            raise ValueError(f"data.max_tokens_per_microbatch={self.tokens} must be a multiple of parallel.tp="
                             f"{model.tp} under sequence parallelism")
        local_tokens = self.tokens // model.tp if model.sequence_parallel else self.tokens
        hidden = torch.zeros(local_tokens, model.config.text_config.hidden_size, dtype=model.dtype, device=self.device,
                             requires_grad=True)  # the metadata carries requires_grad: gradients flow back
        inputs = torch.zeros(1, 1, dtype=torch.int64, device=self.device) if model.pre_process else hidden
        # the last stage gathers the sequence-parallel shards back to the full [T, H] for the loss
        output = torch.zeros(self.tokens, hidden.shape[1], dtype=model.dtype, device=self.device,
                             requires_grad=True) if model.post_process else hidden
        return {"input_args": (inputs,), "output_args": (output,)}

    def next_forward_index(self, chunk: int) -> int:
        k = self._forwards[chunk]
        self._forwards[chunk] += 1
        return k

    def _loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss_of(hidden, int(target.reshape(-1)[0]))  # the target is the micro-batch's index

    def run(self, microbatches: Sequence, first_forward: Callable, loss_of: Callable) -> list[torch.Tensor]:
        """Forward and backward of `microbatches` (MicroBatch already padded to the static shape, on
        the device; their count one the schedule runs). `first_forward(chunk, k)`: stage 0's output
        for micro-batch k; `loss_of(hidden, k)`: the loss of micro-batch k from the last stage's
        final hidden states (what its backward starts from). Returns the losses on the last stage,
        [] elsewhere. Tied-embedding gradients are synced afterwards."""
        n = len(microbatches)
        for mb in microbatches:
            if mb.num_tokens != self.tokens or mb.cu_seqlens.numel() != self.slots + 1:
                raise ValueError(f"pipeline micro-batches must be padded to {self.tokens} tokens and "
                                 f"{self.slots} segments (MicroBatch.pad_to); got {mb.num_tokens} tokens, "
                                 f"{mb.cu_seqlens.numel() - 1} segments")
        schedule = self._schedule(n)
        self.current, self.first_forward, self._loss_of = list(microbatches), first_forward, loss_of
        self._forwards = [0] * len(self.chunks)
        losses: list = []
        args = (torch.arange(n, device=self.device).reshape(n, 1),) if self.first.pre_process else ()
        target = torch.arange(n).reshape(n, 1) if self.last.post_process else None
        try:
            schedule.step(*args, target=target, losses=losses, return_outputs=False)
        finally:
            self.current, self.first_forward, self._loss_of = [], None, None
        self._sync_tied_embeddings()
        return losses if self.last.post_process else []

    def pad(self, mb, pad_token_id: int = 0):
        """`mb` padded to the pipeline's static shape, with a clear error when it cannot fit."""
        if mb.num_tokens > self.tokens:
            raise ValueError(f"a micro-batch of {mb.num_tokens} tokens does not fit the pipeline's static shape of "
                             f"data.max_tokens_per_microbatch={self.tokens} tokens: under parallel.pp > 1 every "
                             f"packed sequence must fit the budget (raise data.max_tokens_per_microbatch or lower "
                             f"data.max_length)")
        return mb.pad_to(self.tokens, self.slots, pad_token_id=pad_token_id)

    def forward_backward(self, microbatches: Sequence, *, global_label_tokens: int) -> float:
        from lingshu_fast.train.step import lm_loss_sum, model_inputs

        denominator = float(max(global_label_tokens, 1))
        padded = [self.pad(mb).to(self.device, pixel_dtype=self.first.dtype) for mb in microbatches]

        def first_forward(chunk, k: int) -> torch.Tensor:
            return chunk(**model_inputs(padded[k])).hidden_states

        def loss_of(hidden: torch.Tensor, k: int) -> torch.Tensor:
            return lm_loss_sum(hidden, self.last.lm_head_weight, padded[k].labels, self.tp_group,
                               self.opts) / denominator

        losses = self.run(padded, first_forward, loss_of)
        return float(sum(float(x.detach()) for x in losses)) if self.last.post_process else 0.0

    def _sync_tied_embeddings(self) -> None:
        from megatron.core import parallel_state as ps

        if not self.tied or self.dims.pp == 1 or not ps.is_rank_in_embedding_group():
            return
        # the embedding lives on chunk 0 of the first rank, the head's copy on the last chunk of the last
        weight = self.first.embed_tokens.weight if self.first.pre_process else self.last.lm_head.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=ps.get_embedding_group())
