"""fused_linear_grpo_loss against an fp64 full-logits oracle written from the definitions (verl's
compute_policy_loss + agg_loss, the k3 estimator), against Liger's LigerFusedLinearGRPOLoss, across the
Triton (interpreter) path, and vocab-parallel TP=2 over gloo against TP=1."""
from __future__ import annotations

import pytest
import torch

from lingshu_fast.kernels.fused_linear_grpo_loss import LOSS_AGGS, fused_linear_grpo_loss
from lingshu_fast.parallel.spawn import spawn


def oracle(hidden, weight, labels, adv, mask, seq, old, ref, beta, clip_low, clip_high, temperature, loss_agg):
    """fp64, full logits, one Python loop over sequences; returns (loss, stats)."""
    logits = hidden.double() @ weight.double().T / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(1, labels.clamp_min(0)[:, None])[:, 0][mask]
    a = adv.double()[mask]
    old_m = logp.detach() if old is None else old.double()[mask]
    ratio = torch.exp(logp - old_m)
    pg1, pg2 = -a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(pg1, pg2)
    kl = torch.zeros((), dtype=torch.float64)
    if ref is not None:
        d = ref.double()[mask] - logp
        k3 = torch.exp(d) - d - 1
        per_token = per_token + beta * k3
        kl = k3.mean() if k3.numel() else kl
    if loss_agg == "token-mean":
        loss = per_token.sum() / max(int(mask.sum()), 1)
    else:
        seq_m, seq_losses = seq[mask], []
        for s in seq_m.unique().tolist():
            tok = per_token[seq_m == s]
            seq_losses.append(tok.mean() if loss_agg == "seq-mean-token-mean" else tok.sum())
        loss = torch.stack(seq_losses).mean() if seq_losses else per_token.sum()
    n = max(int(mask.sum()), 1)
    stats = {"clip_frac": (pg2 > pg1).double().sum() / n, "kl": kl.detach(),
             "ratio_mean": ratio.detach().sum() / n, "logp_mean": logp.detach().sum() / n}
    return loss, stats


def make_batch(seed, n=37, hidden_size=24, vocab=50, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * 0.3
    labels = torch.randint(0, vocab, (n,), generator=gen)
    # Unsorted, non-contiguous sequence ids; sequence 99 has no masked token at all.
    seq = torch.tensor([5, 3, 99, 12])[torch.randint(0, 4, (n,), generator=gen)]
    mask = (torch.rand(n, generator=gen) > 0.25) & (seq != 99)
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    per_seq_adv = {5: 1.3, 3: -0.7, 99: 2.0, 12: 0.4}
    adv = torch.tensor([per_seq_adv[int(s)] for s in seq])
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, labels.clamp_min(0)[:, None])[:, 0]
    old = logp + 0.4 * torch.randn(n, generator=gen)  # spreads ratios well past both clip edges
    ref = logp + 0.3 * torch.randn(n, generator=gen)
    return (hidden.to(dtype), weight.to(dtype), labels, adv, mask, seq, old, ref)


SCENARIOS = {
    "on-policy": dict(use_old=False, use_ref=False, beta=0.0, clip_low=0.2, clip_high=0.2, temperature=1.0),
    "off-policy+kl": dict(use_old=True, use_ref=True, beta=0.1, clip_low=0.2, clip_high=0.28, temperature=0.7),
    "off-policy,ref-reported": dict(use_old=True, use_ref=True, beta=0.0, clip_low=0.1, clip_high=0.3,
                                    temperature=1.3),
}


def _run_both(batch, sc, loss_agg):
    hidden, weight, labels, adv, mask, seq, old, ref = batch
    kw = dict(old_logprobs=old if sc["use_old"] else None, ref_logprobs=ref if sc["use_ref"] else None,
              beta=sc["beta"], clip_low=sc["clip_low"], clip_high=sc["clip_high"],
              temperature=sc["temperature"], loss_agg=loss_agg)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats = fused_linear_grpo_loss(h, w, labels, adv, mask, seq, **kw)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want, want_stats = oracle(h64, w64, labels, adv, mask, seq, kw["old_logprobs"], kw["ref_logprobs"],
                              sc["beta"], sc["clip_low"], sc["clip_high"], sc["temperature"], loss_agg)
    want.backward()
    return (loss, stats, h.grad, w.grad), (want, want_stats, h64.grad, w64.grad)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_matches_full_logits_oracle(loss_agg, scenario):
    """Pins the PPO clip (asymmetric), k3 sign and gradient, temperature, each aggregation (a sequence
    with no masked token is left out of the sequence means) and the stats. fp32 logits of O(1) against
    an fp64 oracle: 2e-5 absolute is ~100 ulp of the loss and of every gradient entry."""
    (loss, stats, gh, gw), (want, want_stats, gh64, gw64) = _run_both(make_batch(1), SCENARIOS[scenario], loss_agg)
    torch.testing.assert_close(loss.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(gh.double(), gh64, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(gw.double(), gw64, atol=2e-5, rtol=2e-5)
    for key, value in want_stats.items():
        torch.testing.assert_close(stats[key].double(), value.double(), atol=2e-5, rtol=2e-5, msg=key)
    if scenario != "on-policy":
        assert 0.05 < float(stats["clip_frac"]) < 0.95, "the batch must exercise both branches"


def test_matches_liger():
    """Liger's LigerFusedLinearGRPOLoss (pure-torch chunked) on [B, T] batches where every sequence has
    masked tokens: its loss_type 'bnpo' is our token-mean and 'grpo' our seq-mean-token-mean (Liger's
    per-sequence mean divided by B). Same k3, clip and temperature; its kl and clip-fraction metrics are
    token means like ours. Both fp32, different chunking: 1e-5."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b, t, vocab, hidden_size = 3, 9, 40, 16
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(b, t, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * 0.3
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    mask = torch.rand(b, t, generator=gen) > 0.3
    mask[:, 0] = True
    adv_seq = torch.tensor([1.0, -0.5, 0.25])
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T / 0.9, -1).gather(2, ids[..., None])[..., 0]
    old = logp + 0.3 * torch.randn(b, t, generator=gen)
    ref = logp + 0.3 * torch.randn(b, t, generator=gen)
    for liger_type, ours in (("bnpo", "token-mean"), ("grpo", "seq-mean-token-mean")):
        liger = LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, use_ref_model=True, epsilon_low=0.2,
                                         epsilon_high=0.28, loss_type=liger_type, temperature=0.9)
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss_l, (kl_l, clip_l) = liger(h1, w1, ids, mask.long(), adv_seq, ref_per_token_logps=ref,
                                       old_per_token_logps=old)
        loss_l.backward()
        h2, w2 = hidden.reshape(b * t, -1).clone().requires_grad_(), weight.clone().requires_grad_()
        loss_o, stats = fused_linear_grpo_loss(
            h2, w2, ids.reshape(-1), adv_seq.repeat_interleave(t), mask.reshape(-1),
            torch.arange(b).repeat_interleave(t), old_logprobs=old.reshape(-1), ref_logprobs=ref.reshape(-1),
            beta=0.04, clip_low=0.2, clip_high=0.28, temperature=0.9, loss_agg=ours)
        loss_o.backward()
        torch.testing.assert_close(loss_o, loss_l, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h2.grad, h1.grad.reshape(b * t, -1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w2.grad, w1.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats["kl"], kl_l, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats["clip_frac"], clip_l, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_all_masked_is_zero_and_finite(loss_agg):
    """No masked token: loss exactly 0, zero gradients, stats 0 - even with inf/NaN old/ref log-probs and
    advantages at those (unmasked) positions, which must not leak a NaN through the backward."""
    hidden, weight, labels, adv, mask, seq, old, ref = make_batch(2)
    mask = torch.zeros_like(mask)
    old, ref, adv = torch.full_like(old, float("-inf")), torch.full_like(ref, float("nan")), adv * float("inf")
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss, stats = fused_linear_grpo_loss(h, w, labels, adv, mask, seq, old_logprobs=old, ref_logprobs=ref,
                                         beta=0.1, loss_agg=loss_agg)
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad.eq(0).all() and w.grad.eq(0).all()
    assert all(v.item() == 0.0 for v in stats.values()), stats


def test_unmasked_positions_are_inert():
    """Garbage (other labels, inf/NaN inputs) at unmasked positions changes neither loss nor gradients."""
    hidden, weight, labels, adv, mask, seq, old, ref = make_batch(4)
    outs = []
    for poison in (False, True):
        lab, a, o, r = labels.clone(), adv.clone(), old.clone(), ref.clone()
        if poison:
            lab[~mask], a[~mask], o[~mask], r[~mask] = 7, float("nan"), float("inf"), float("-inf")
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = fused_linear_grpo_loss(h, w, lab, a, mask, seq, old_logprobs=o, ref_logprobs=r, beta=0.2,
                                         loss_agg="seq-mean-token-mean")
        loss.backward()
        outs.append((loss.detach(), h.grad, w.grad))
    for clean, poisoned in zip(*outs):
        torch.testing.assert_close(poisoned, clean, atol=0, rtol=0)


def test_clear_errors():
    hidden, weight, labels, adv, mask, seq, old, ref = make_batch(5)
    with pytest.raises(ValueError, match="loss_agg"):
        fused_linear_grpo_loss(hidden, weight, labels, adv, mask, seq, loss_agg="seq-sum")
    with pytest.raises(ValueError, match="advantages must have shape"):
        fused_linear_grpo_loss(hidden, weight, labels, adv[:-1], mask, seq)
    with pytest.raises(TypeError, match="bool"):
        fused_linear_grpo_loss(hidden, weight, labels, adv, mask.long(), seq)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_grpo_loss(hidden, weight, labels, adv, mask, seq, temperature=0.0)


def _ours(batch, sc, loss_agg, tp_group=None, weight=None):
    hidden, full_weight, labels, adv, mask, seq, old, ref = batch
    h = hidden.clone().requires_grad_()
    w = (full_weight if weight is None else weight).clone().requires_grad_()
    loss, stats = fused_linear_grpo_loss(
        h, w, labels, adv, mask, seq, old_logprobs=old if sc["use_old"] else None,
        ref_logprobs=ref if sc["use_ref"] else None, beta=sc["beta"], clip_low=sc["clip_low"],
        clip_high=sc["clip_high"], temperature=sc["temperature"], loss_agg=loss_agg, tp_group=tp_group)
    loss.backward()
    return loss.detach(), {k: v for k, v in stats.items()}, h.grad, w.grad


def test_triton_path_equals_torch_path(monkeypatch):
    """The CE's Triton kernels (interpreter, ragged 16x32x16 tiles at V=50, H=24) under the GRPO
    arithmetic give the torch path's loss, stats and gradients. Both fp32 with different summation
    order (tiled dots, atomics): 1e-5."""
    batch = make_batch(6)
    for loss_agg, scenario in (("token-mean", "off-policy+kl"), ("seq-mean-token-sum", "on-policy")):
        monkeypatch.setenv("LINGSHU_KERNELS", "torch")
        want = _ours(batch, SCENARIOS[scenario], loss_agg)
        monkeypatch.setenv("LINGSHU_KERNELS", "triton")
        got = _ours(batch, SCENARIOS[scenario], loss_agg)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_bf16_close_to_fp64_oracle():
    """bf16 hidden/weight (the GPU dtype): logits in bf16-rounded inputs with fp32 accumulation. The
    bound is bf16's input rounding (2^-8 relative) carried through O(1) logits: 3e-2 on the loss and on
    the gradients' relative norm error; a wrong sign or missing term is O(1)."""
    batch = make_batch(7, dtype=torch.bfloat16)
    sc = SCENARIOS["off-policy+kl"]
    loss, _, gh, gw = _ours(batch, sc, "seq-mean-token-mean")
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    hidden, weight, labels, adv, mask, seq, old, ref = batch
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want, _ = oracle(h64, w64, labels, adv, mask, seq, old, ref, sc["beta"], sc["clip_low"], sc["clip_high"],
                     sc["temperature"], "seq-mean-token-mean")
    want.backward()
    torch.testing.assert_close(loss.double(), want, atol=3e-2, rtol=3e-2)
    for got, ref64 in ((gh, h64.grad), (gw, w64.grad)):
        assert (got.double() - ref64).norm() <= 3e-2 * ref64.norm()


def _tp_worker(dims, batch, cases):
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    shard = batch[1].chunk(dims.tp)[dims.tp_rank]
    return [_ours(batch, SCENARIOS[sc], agg, tp_group=group, weight=shard) for agg, sc in cases]


@pytest.mark.dist
def test_tp2_equals_tp1():
    """Vocab-parallel over gloo (one spawn): each rank holds half the vocabulary (25 of 50 rows). The
    loss and stats must be identical on both ranks and equal TP=1; grad_weight shards concatenate to
    TP=1's; grad_hidden is TP=1's on every rank (the CE all-reduces it, see its docstring). fp32 with a
    split log-sum-exp: 1e-5."""
    batch = make_batch(8)
    cases = [(agg, "off-policy+kl") for agg in LOSS_AGGS] + [("token-mean", "on-policy")]
    per_rank = spawn(_tp_worker, 2, batch, cases, tp=2)
    for i, (agg, sc) in enumerate(cases):
        loss, stats, gh, gw = _ours(batch, SCENARIOS[sc], agg)
        for rank in range(2):
            r_loss, r_stats, r_gh, _ = per_rank[rank][i]
            torch.testing.assert_close(r_loss, loss, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(r_gh, gh, atol=1e-5, rtol=1e-5)
            for key in stats:
                torch.testing.assert_close(r_stats[key], stats[key], atol=1e-5, rtol=1e-5, msg=key)
        torch.testing.assert_close(torch.cat([per_rank[0][i][3], per_rank[1][i][3]]), gw, atol=1e-5, rtol=1e-5)
