"""Pipeline parallelism: torch.distributed.pipelining schedules over Megatron-Core's PP group.

Layout. Stage s holds decoder layers [start_s, end_s); the first stage also holds the vision tower
and the embeddings, the last the final norm and the LM head. `stage_layer_range` balances the
stages by the model's FLOP estimate (`lingshu_fast.model.flops.pipeline_layer_split`), in which the
first stage pays for the ViT on a representative image load and the last for the LM head.

Shapes. The schedules' receive buffers have fixed shapes, so every micro-batch is padded to the
token budget (`data.max_tokens_per_microbatch`) with the tail as its own segment (labels -100),
and `cu_seqlens` to a fixed number of slots (`MicroBatch.pad_to`). Only `hidden [T, H]` crosses a
stage boundary: every rank of a pipeline loads the same micro-batches (same DP rank), and the
single-stage schedules (GPipe, 1F1B) run each stage's forwards in micro-batch order, so a stage
reads the positions and segment boundaries of its k-th forward from its own copy. (Passing the
integer tensors through the schedule deadlocks 1F1B on gloo: their gradient sends and receives do
not pair up.)

Stage metadata is static (from these fixed shapes), never inferred by a trial forward.

Inputs of the first stage. Images differ in size from one micro-batch to the next, so they do not
go through the schedule's input splitting: the first stage receives only the micro-batch's index
and reads that micro-batch (ids, positions, pixels) from the runner. The last stage's loss gets the
padded labels as the schedule's target and returns `sum CE / global_label_tokens`, as the
non-pipelined step does, with `scale_grads=False`.

Tied embeddings (PP > 1). The last stage keeps its own copy of the embedding as LM head; their
gradients are summed over Megatron-Core's embedding group after the backward so both copies take
the same update, and the copy on the last stage is marked `shared` so the gradient norm counts it
once.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

SEGMENT_SLOTS_PER_TOKENS = 8  # a packed sample is at least 8 tokens (chat template overhead)


def stage_layer_range(hf_config, pp: int, pp_rank: int, tokens_per_microbatch: int) -> tuple[int, int]:
    """Decoder layers of pipeline stage `pp_rank`, for micro-batches of `tokens_per_microbatch` tokens of
    which a quarter are image tokens (4 ViT patches each): a typical multimodal mix."""
    from lingshu_fast.model.flops import pipeline_layer_split

    split = pipeline_layer_split(hf_config, pp, seq_len=tokens_per_microbatch, image_patches=tokens_per_microbatch)
    return split[pp_rank]


class _StageModule(nn.Module):
    """Adapts the model slice to the schedule's positional tensor interface: the first stage takes
    a micro-batch index, the others the previous stage's hidden states; every stage reads the
    micro-batch's positions and boundaries from the runner."""

    def __init__(self, model, runner: "PipelineRunner"):
        super().__init__()
        self.model, self.runner = model, runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mb = self.runner.next_forward_microbatch()
        if self.model.pre_process:
            out = self.model(input_ids=mb.input_ids, position_ids=mb.position_ids, cu_seqlens=mb.cu_seqlens,
                             pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw, max_seqlen=mb.max_seqlen)
        else:
            out = self.model(hidden_states=x, position_ids=mb.position_ids, cu_seqlens=mb.cu_seqlens,
                             max_seqlen=mb.max_seqlen)
        return out.hidden_states


class PipelineRunner:
    def __init__(self, model, dims, cfg, opts):
        from megatron.core import parallel_state as ps
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if cfg.parallel.pp_schedule == "interleaved" or cfg.parallel.virtual_stages > 1:
            raise ValueError("parallel.pp_schedule=interleaved is not available yet; use 1f1b or gpipe")
        self.model, self.dims, self.opts = model, dims, opts
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.tokens = cfg.data.max_tokens_per_microbatch
        self.slots = self.tokens // SEGMENT_SLOTS_PER_TOKENS + 2
        self.per_rank = cfg.train.global_microbatches // dims.dp
        self.device = next(model.parameters()).device
        self.current: list = []
        self._forwards = 0
        self._denominator = 1.0
        self.tied = bool(model.config.tie_word_embeddings)
        if self.tied and model.post_process and not model.pre_process:
            model.lm_head.weight.shared = True
        stage = PipelineStage(_StageModule(model, self), dims.pp_rank, dims.pp, self.device, group=self.pp_group,
                              **self._static_shapes(model))
        schedule_cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[cfg.parallel.pp_schedule]
        if self.per_rank < dims.pp and schedule_cls is Schedule1F1B:
            raise ValueError(f"1F1B needs at least parallel.pp={dims.pp} micro-batches per DP rank and step; "
                             f"train.global_microbatches={cfg.train.global_microbatches} gives {self.per_rank}")
        # every stage gets the loss function: the schedule runs backward only where one is given
        self.schedule = schedule_cls(stage, self.per_rank, loss_fn=self._loss, scale_grads=False)

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

    def next_forward_microbatch(self):
        mb = self.current[self._forwards]
        self._forwards += 1
        return mb

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from lingshu_fast.train.step import lm_loss_sum

        return lm_loss_sum(hidden, self.model.lm_head_weight, labels.reshape(-1), self.tp_group,
                           self.opts) / self._denominator

    def forward_backward(self, microbatches: Sequence, *, global_label_tokens: int) -> float:
        self._denominator = float(max(global_label_tokens, 1))
        self.current = [mb.pad_to(self.tokens, self.slots).to(self.device) for mb in microbatches]
        self._forwards = 0
        n = len(self.current)
        losses: list = []
        args = (torch.arange(n, device=self.device).reshape(n, 1),) if self.model.pre_process else ()
        target = torch.stack([mb.labels for mb in self.current]) if self.model.post_process else None
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        self._sync_tied_embeddings()
        self.current = []
        return float(sum(float(x.detach()) for x in losses)) if self.model.post_process else 0.0

    def _sync_tied_embeddings(self) -> None:
        from megatron.core import parallel_state as ps

        if not self.tied or self.dims.pp == 1 or not ps.is_rank_in_embedding_group():
            return
        weight = self.model.embed_tokens.weight if self.model.pre_process else self.model.lm_head.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=ps.get_embedding_group())
