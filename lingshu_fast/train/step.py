"""Stages 1-3's loss: next-token cross-entropy over packed micro-batches, for the step engine.

The loss of a step is the cross-entropy summed over every label token of every micro-batch of every
data-parallel rank, divided by the step's global label count. `loss_of` returns a micro-batch's
SUM; the engine all-reduces the label count with the step's other scalars and scales the gradients
by its inverse once (engine.py). So the gradient is that of the global token mean whatever the
layout and however tokens fall into micro-batches (not the mean of per-micro-batch means, which
would weight a short micro-batch's tokens more), and the DP reduction of gradients is a plain sum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from lingshu_fast.data.batch import MicroBatch
from lingshu_fast.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy


@dataclass(frozen=True)
class LossOptions:
    z_loss_weight: float = 0.0
    label_smoothing: float = 0.0
    filter_eps: float = 0.0  # train.loss_filter_eps


def lm_loss_sum(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                tp_group: Optional[dist.ProcessGroup], opts: LossOptions, head_grad: Optional[dict] = None) -> torch.Tensor:
    """Summed next-token cross-entropy of final hidden states against (pre-shifted) labels, from the
    vocab-sharded head weight, without materialising logits. `head_grad`: the runner's
    `head_grad_fusion()` (the sum is then backwarded as it is, with gradient 1, as the runners do)."""
    tp = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    return fused_linear_cross_entropy(hidden, lm_head_weight, labels, reduction="sum", tp_group=tp,
                                      z_loss_weight=opts.z_loss_weight, label_smoothing=opts.label_smoothing,
                                      filter_eps=opts.filter_eps,
                                      **(head_grad or {}))


def model_inputs(mb: MicroBatch) -> dict:
    return dict(input_ids=mb.input_ids, position_ids=mb.position_ids, cu_seqlens=mb.cu_seqlens,
                pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw, max_seqlen=mb.max_seqlen)


def sft_closures(runner, microbatches: Sequence[MicroBatch], opts: LossOptions,
                 pad_token_id: int = 0) -> tuple[list[MicroBatch], Callable, Callable]:
    """(the micro-batches as the runner runs them, first_forward, loss_of) of one step."""
    dtype = runner.model.dtype
    mbs = [runner.pad(mb, pad_token_id).to(runner.device, pixel_dtype=dtype) for mb in microbatches]

    def first_forward(first, k: int) -> torch.Tensor:
        return first(**model_inputs(mbs[k])).hidden_states

    def loss_of(hidden: torch.Tensor, k: int):
        return lm_loss_sum(hidden, runner.lm_head_weight, mbs[k].labels, runner.tp_group, opts,
                           runner.head_grad_fusion()), {}

    return mbs, first_forward, loss_of
