"""The GRPO update under pipeline parallelism: stage 4's micro-batches through `PipelineRunner`.

Same loss as `step.forward_backward_rl` (see step.py for the normalisation), with the pipeline's
constraints:
- Static shapes: every micro-batch is padded to `data.max_tokens_per_microbatch` tokens (the pad
  segment untrained: loss_mask False, seq_index -1, advantage 0, log-probs 0) and its `cu_seqlens`
  to the runner's fixed slots. A packed sequence longer than the budget is a clear error.
- Micro-batch count: packing decides how many micro-batches an update has; the runner rounds that
  up to a count its schedule runs (1F1B: at least one per stage) and the rest are empty micro-
  batches (all padding, nothing trained: their loss is 0 * hidden, so the backward still flows).
  Every rank of a pipeline holds the same DP shard of the rollout, so all agree on the count.
- The first stage embeds as `forward_hidden` does (each distinct prompt's images encoded once and
  shared by its group); the last stage computes the GRPO loss of the micro-batch, scaled by
  count / global_count, and keeps its statistics.
- Metrics: only the last stage sees the loss; its totals are broadcast over the pipeline group so
  that every rank returns the same sums (the loop then all-reduces them over DP, as without PP).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from lingshu_fast.data.batch import MicroBatch
from lingshu_fast.rl.step import RLMicroBatch, forward_hidden, grpo_loss, norm_count

TOTAL_KEYS = ("loss", "kl", "clip_frac", "masked_tokens")


def _pad_tail(t: Optional[torch.Tensor], n: int, value) -> Optional[torch.Tensor]:
    return None if t is None else torch.cat([t, t.new_full((n,), value)])


def pad_rl_microbatch(rmb: RLMicroBatch, runner, pad_token_id: int = 0) -> RLMicroBatch:
    """`rmb` at the pipeline's static shape; the padding trains nothing."""
    mb = runner.pad(rmb.mb, pad_token_id)
    extra = mb.num_tokens - rmb.mb.num_tokens
    return dataclasses.replace(
        rmb, mb=mb, loss_mask=_pad_tail(rmb.loss_mask, extra, False), seq_index=_pad_tail(rmb.seq_index, extra, -1),
        advantages=_pad_tail(rmb.advantages, extra, 0.0), old_logprobs=_pad_tail(rmb.old_logprobs, extra, 0.0),
        ref_logprobs=_pad_tail(rmb.ref_logprobs, extra, 0.0))


def empty_rl_microbatch(runner, pad_token_id: int = 0) -> RLMicroBatch:
    """A micro-batch of padding only, filling an update up to a count the schedule runs."""
    nothing = torch.zeros(0, dtype=torch.int64)
    mb = MicroBatch(input_ids=nothing, labels=nothing.clone(), position_ids=torch.zeros(3, 0, dtype=torch.int64),
                    cu_seqlens=torch.zeros(1, dtype=torch.int32), max_seqlen=0)
    rmb = RLMicroBatch(mb=mb, loss_mask=torch.zeros(0, dtype=torch.bool), seq_index=nothing.clone(),
                       advantages=torch.zeros(0), prompt_pixel_values=None, prompt_grid_thw=None,
                       prompt_image_tokens=[], seq_prompt=[])
    return pad_rl_microbatch(rmb, runner, pad_token_id)


def pipeline_forward_backward_rl(runner, rmbs: Sequence[RLMicroBatch], *, global_count: int, rl_cfg,
                                 pad_token_id: int = 0) -> dict[str, float]:
    """`forward_backward_rl` through the pipeline schedule: the same SUMS (`loss`, `kl` and
    `clip_frac` times masked tokens, `masked_tokens`) on every rank of the pipeline.

    `rmbs` carry old/ref log-probs on the last stage's rank (from `sequence_logprobs`); the other
    ranks may have None there: only the last stage reads them."""
    denom = float(max(global_count, 1))
    padded = [pad_rl_microbatch(rmb, runner, pad_token_id) for rmb in rmbs]
    fill = runner.microbatch_count(len(padded)) - len(padded)
    padded += [empty_rl_microbatch(runner, pad_token_id) for _ in range(fill)]
    padded = [rmb.to(runner.device) for rmb in padded]
    sums = torch.zeros(len(TOTAL_KEYS), dtype=torch.float64, device=runner.device)

    def first_forward(chunk, k: int) -> torch.Tensor:
        return forward_hidden(chunk, padded[k])

    def loss_of(hidden: torch.Tensor, k: int) -> torch.Tensor:
        rmb = padded[k]
        count = norm_count(rmb, rl_cfg.loss_agg)
        if count == 0:  # padding only: a zero loss that still gives the stages their (zero) gradients
            return hidden.sum() * 0.0
        loss, stats = grpo_loss(hidden, runner.last.lm_head_weight, rmb, rl_cfg, runner.tp_group)
        scaled = loss * (count / denom)
        n = rmb.num_masked
        sums.add_(torch.stack([scaled.detach().double(), stats["kl"].detach().double() * n,
                               stats["clip_frac"].detach().double() * n, sums.new_tensor(float(n))]))
        return scaled

    runner.run([rmb.mb for rmb in padded], first_forward, loss_of)
    from lingshu_fast.parallel.relay import broadcast_from_last_stage

    broadcast_from_last_stage(sums)
    return dict(zip(TOTAL_KEYS, sums.tolist()))
