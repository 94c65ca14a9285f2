"""One optimizer step's forward and backward over this rank's micro-batches (no pipeline).

The loss of a step is the cross-entropy summed over every label token of every micro-batch of every
data-parallel rank, divided by the step's global label count (`global_label_tokens`, all-reduced
before the first forward). Each micro-batch therefore contributes `sum_CE(mb) / global_label_tokens`
and the DP all-reduce of gradients is a plain sum: the gradient is that of the global token mean,
whatever the layout and however tokens fall into micro-batches (not the mean of per-micro-batch
means, which would weight a short micro-batch's tokens more).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from lingshu_fast.data.batch import MicroBatch
from lingshu_fast.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy


@dataclass(frozen=True)
class LossOptions:
    z_loss_weight: float = 0.0
    label_smoothing: float = 0.0


def lm_loss_sum(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                tp_group: Optional[dist.ProcessGroup], opts: LossOptions) -> torch.Tensor:
    """Summed next-token cross-entropy of final hidden states against (pre-shifted) labels, from the
    vocab-sharded head weight, without materialising logits."""
    tp = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    return fused_linear_cross_entropy(hidden, lm_head_weight, labels, reduction="sum", tp_group=tp,
                                      z_loss_weight=opts.z_loss_weight, label_smoothing=opts.label_smoothing)


def model_inputs(mb: MicroBatch) -> dict:
    return dict(input_ids=mb.input_ids, position_ids=mb.position_ids, cu_seqlens=mb.cu_seqlens,
                pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw, max_seqlen=mb.max_seqlen)


def forward_backward(model: torch.nn.Module, microbatches: Sequence[MicroBatch], *, global_label_tokens: int,
                     tp_group: Optional[dist.ProcessGroup], opts: LossOptions = LossOptions()) -> float:
    """Run forward+backward on each micro-batch; return this rank's share of the step loss."""
    denom = float(max(global_label_tokens, 1))
    total = torch.zeros((), dtype=torch.float32)
    for mb in microbatches:
        out = model(**model_inputs(mb))
        loss = lm_loss_sum(out.hidden_states, model.lm_head_weight, mb.labels, tp_group, opts) / denom
        loss.backward()
        total = total.to(loss.device) + loss.detach()  # one host sync per step, not per micro-batch
    return float(total)
