"""Fused linear GRPO loss: PPO-clipped policy loss with an optional k3 KL, from hidden states, never
holding [N, V] logits, vocab-parallel under a tensor-parallel group.

`fused_linear_grpo_loss(hidden [N,H], weight [V_local,H], labels [N], advantages [N], loss_mask [N] bool,
seq_index [N] long, *, old_logprobs=None, ref_logprobs=None, beta=0.0, clip_low=0.2, clip_high=0.2,
temperature=1.0, loss_agg="token-mean", tp_group=None, main_grad=None, on_main_grad=None) -> (loss, stats)`
(`main_grad`: the weight's gradient is added into it instead of returned, see fused_linear_cross_entropy)

Per token t with loss_mask[t]:
    logp  = log_softmax(hidden @ weight.T / temperature)[label]
    ratio = exp(logp - old)                      (old = logp.detach() when old_logprobs is None)
    pg    = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
    k3    = exp(ref - logp) - (ref - logp) - 1    (only when ref_logprobs is given)
    loss_t = pg + beta * k3
Aggregation, as verl's `agg_loss` defines it (sequences are the distinct ids of seq_index, any ids):
    token-mean           sum_t loss_t / #masked tokens
    seq-mean-token-mean  mean over sequences of (sum of the sequence's loss_t / its #masked tokens)
    seq-mean-token-sum   mean over sequences of (sum of the sequence's loss_t)
Deviation from verl, on purpose: the sequence means run over sequences that HAVE masked tokens. verl's
seq-mean-token-mean gives NaN (0/0) for a sequence with none, and its seq-mean-token-sum counts it in the
denominator, so a padded-out row would shrink the loss. With every sequence non-empty the two agree.
Tokens outside loss_mask contribute nothing, whatever their labels, advantages or old/ref log-probs hold
(even inf/NaN there is harmless: those inputs are replaced before any arithmetic, so no NaN gradient
leaks through a `where`). No mask at all: loss 0, gradients 0. verl clamps the log-ratio to [-20, 20]
and k3 to [-10, 10]; Liger does not, and neither do we (the issue's formula, exact gradients).

stats (detached fp32 scalars, token means over masked tokens, 0 when there are none): `clip_frac`
(verl's pg_clipfrac: the clipped branch is the active one, i.e. ratio > 1+clip_high with A > 0 or
ratio < 1-clip_low with A < 0), `kl` (mean k3, 0 without ref_logprobs), `ratio_mean`, `logp_mean`.

How: the per-token log-probs come from `fused_linear_cross_entropy(..., reduction="none")` (the same
one tiled online-logsumexp kernel for both losses): logp = -CE with the labels of unmasked tokens set to
ignore_index. Its backward takes an arbitrary per-token upstream gradient, which here is dL/dlogp from
the PPO arithmetic above - cheap plain-torch work on [N] vectors (a few microseconds against the
O(N*V*H) sweeps, so no Triton kernel of its own; the CE picks its Triton or torch path through
`use_triton` itself). Under `tp_group` the CE all-reduces max / sum-exp / target logit, so logp and hence
the loss and stats are identical on every rank, and the gradients follow the CE's TP convention.
temperature != 1 divides the hidden states (an [N, H] copy, cheaper than a [V, H] one).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._flce_aot import flce_aot_specs
from .fused_linear_cross_entropy import fused_linear_cross_entropy

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
_IGNORE = -100


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = _IGNORE,
    tp_group=None,
    main_grad: Optional[torch.Tensor] = None,
    on_main_grad=None,
) -> torch.Tensor:
    """log_softmax(hidden @ weight.T / temperature)[labels] per token ([N] fp32, 0 where ignored),
    without [N, V] logits; differentiable. Also what the RL step uses for old/reference log-probs.
    `main_grad` / `on_main_grad`: the weight's gradient is added into main_grad in backward (see
    fused_linear_cross_entropy's gradient-accumulation fusion)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = hidden if temperature == 1.0 else hidden / temperature
    nll = fused_linear_cross_entropy(
        scaled, weight, labels, ignore_index=ignore_index, reduction="none", tp_group=tp_group,
        main_grad=main_grad, on_main_grad=on_main_grad,
    )
    return -nll.float()


def _check_inputs(hidden, weight, labels, advantages, loss_mask, seq_index, old_logprobs, ref_logprobs,
                  clip_low, clip_high, loss_agg) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear_grpo_loss expects hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)} (flatten [B, T, H] to [B*T, H] first)"
        )
    n = hidden.shape[0]
    per_token = {"labels": labels, "advantages": advantages, "loss_mask": loss_mask, "seq_index": seq_index,
                 "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs}
    for name, t in per_token.items():
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape [N] = [{n}] (one value per token), got {tuple(t.shape)}")
    if loss_mask.dtype != torch.bool:
        raise TypeError(f"loss_mask must be a bool tensor, got {loss_mask.dtype}")
    if seq_index.is_floating_point():
        raise TypeError(f"seq_index must hold integer sequence ids, got {seq_index.dtype}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg={loss_agg!r} is not one of {', '.join(LOSS_AGGS)}")
    if not (0.0 <= clip_low < 1.0) or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0; got clip_low={clip_low}, clip_high={clip_high}")


@torch.no_grad()
def aggregation_weights(loss_mask: torch.Tensor, seq_index: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """[N] fp32 w such that loss = sum_t w_t * loss_t realises `loss_agg` (0 on unmasked tokens)."""
    mask = loss_mask.float()
    if loss_agg == "token-mean":
        return mask / mask.sum().clamp_min(1.0)
    seq_ids, seq = torch.unique(seq_index, return_inverse=True)
    tokens_per_seq = torch.zeros(seq_ids.numel(), device=mask.device).index_add_(0, seq, mask)
    n_seqs = (tokens_per_seq > 0).sum().clamp_min(1).float()
    if loss_agg == "seq-mean-token-mean":
        return mask / (tokens_per_seq[seq].clamp_min(1.0) * n_seqs)
    return mask / n_seqs


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, n_masked: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum() / n_masked


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    seq_index: torch.Tensor,
    *,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    tp_group=None,
    main_grad: Optional[torch.Tensor] = None,
    on_main_grad=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO/PPO clipped loss from hidden states; see the module docstring for the exact definition."""
    _check_inputs(hidden, weight, labels, advantages, loss_mask, seq_index, old_logprobs, ref_logprobs,
                  clip_low, clip_high, loss_agg)
    ce_labels = torch.where(loss_mask, labels, torch.full_like(labels, _IGNORE))
    logp = token_logprobs(hidden, weight, ce_labels, temperature=temperature, tp_group=tp_group,
                          main_grad=main_grad, on_main_grad=on_main_grad)
    logp_now = logp.detach()
    zeros = torch.zeros_like(logp_now)
    # Unmasked positions get neutral inputs (ratio 1, A 0, ref = logp) so that nothing non-finite can
    # enter the graph there: a NaN behind a `where` still poisons the gradient.
    adv = torch.where(loss_mask, advantages.float(), zeros)
    old = logp_now if old_logprobs is None else torch.where(loss_mask, old_logprobs.float(), logp_now)

    ratio = torch.exp(logp - old)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg_unclipped, pg_clipped)

    k3 = None
    if ref_logprobs is not None:
        ref = torch.where(loss_mask, ref_logprobs.float(), logp_now)
        if beta != 0.0:
            delta = ref - logp
            k3 = torch.exp(delta) - delta - 1.0
            per_token = per_token + beta * k3
        else:  # reported only: keep it out of the graph
            delta = ref - logp_now
            k3 = torch.exp(delta) - delta - 1.0

    weights = aggregation_weights(loss_mask, seq_index, loss_agg)
    loss = (weights * per_token).sum()

    with torch.no_grad():
        n_masked = loss_mask.sum().clamp_min(1).float()
        stats = {
            "clip_frac": _masked_mean((pg_clipped > pg_unclipped).float(), loss_mask, n_masked),
            "kl": _masked_mean(k3.detach(), loss_mask, n_masked) if k3 is not None else zeros.sum(),
            "ratio_mean": _masked_mean(ratio.detach(), loss_mask, n_masked),
            "logp_mean": _masked_mean(logp_now, loss_mask, n_masked),
        }
    return loss, stats


def aot_specs() -> list:
    """The Triton launches of this loss on the GPU: the fused CE's kernels as `token_logprobs` calls them
    (bf16, no label smoothing so no logit sum, no gradient filter), at the 7B head's shapes."""
    return flce_aot_specs(prefix="grpo_loss", variants=(("bf16", "tf32"),), sumx=(False,), filters=(False,),
                          three_pass=False)
