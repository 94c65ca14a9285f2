"""The 3-pass path of fused_linear_cross_entropy (scalar loss, gradients computed in forward, scaled by the
upstream gradient in backward) against the plain-PyTorch reference of the 4-pass path and Liger's FLCE.

The interpreter's row stripes are 2 row blocks of 16 rows, so N >= 33 crosses a stripe: grad_weight is then
accumulated across stripes, the part of the path the 4-pass one does not have. Tolerances as in
test_fused_linear_cross_entropy.py: fp32 ~1e-5 (same maths, another summation order); bf16 the CCE bar
(no further from the fp32 truth than torch's own bf16, plus one bf16 ulp of the output's largest entry).
"""
import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F
from flce_cases import AllocationLog, flce_inputs, peaky_inputs

from lingshu_fast.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

flce_mod = importlib.import_module("lingshu_fast.kernels.fused_linear_cross_entropy")
tk = importlib.import_module("lingshu_fast.kernels._flce_triton")


def _run(hidden, weight, labels, reduction, grad_out, **kw):
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, **kw)
    wrt = [t for t in (hidden, weight) if t.requires_grad]
    return (loss.detach(), *torch.autograd.grad(loss, wrt, grad_out))


@pytest.fixture
def spy(monkeypatch):
    """Counts the 3-pass launches of each implementation, so a test cannot pass on the 4-pass path."""
    calls = {"triton": 0, "torch": 0}
    for name, key in (("_triton_forward_with_grads", "triton"), ("_torch_forward_with_grads", "torch")):
        real = getattr(flce_mod, name)

        def wrapped(*args, _real=real, _key=key, **kwargs):
            calls[_key] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(flce_mod, name, wrapped)
    return calls


def _reference(monkeypatch, *args, **kw):
    """The plain-PyTorch 4-pass path (per-row losses, reduction outside, backward with g): the oracle."""
    with monkeypatch.context() as mp:
        mp.setenv("LINGSHU_KERNELS", "torch")
        mp.setattr(flce_mod, "grads_in_forward", lambda *a: False)
        return _run(*args, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", [(37, 45, 150, (3, 17)), (64, 64, 300, tuple(range(0, 64, 5))), (1, 16, 40, ())],
                         ids=lambda c: f"N{c[0]}H{c[1]}V{c[2]}")
def test_fp32_three_pass_matches_reference(monkeypatch, spy, reduction, case):
    """Pins the row-stripe logits / lse partials, the in-place dlogits (with z-loss and smoothing terms),
    grad_weight accumulated across stripes, grad_hidden written per stripe, ignored rows, and the
    backward's scaling by an upstream gradient != 1 (a backward that ignores it is off by 2.5x)."""
    n, h, v, ignored = case
    hidden, weight, labels = flce_inputs(n, h, v, ignored=ignored)
    g = torch.tensor(2.5)
    kw = dict(z_loss_weight=1e-2, label_smoothing=0.1)
    want = _reference(monkeypatch, hidden, weight, labels, reduction, g, **kw)
    monkeypatch.setenv("LINGSHU_KERNELS", "triton")
    got = _run(hidden, weight, labels, reduction, g, **kw)
    assert spy["triton"] == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_bf16_three_pass_meets_cce_bar(monkeypatch, spy, path):
    """bf16 training inputs on both implementations of the 3-pass path: the stored logits and dlogits are
    bf16 and grad_weight is added into bf16 once per row stripe (two stripes here), which must still meet
    the bar the 4-pass path meets."""
    monkeypatch.setenv("LINGSHU_KERNELS", path)
    hidden, weight, labels = flce_inputs(48, 64, 300, dtype=torch.bfloat16, ignored=(1, 7))
    got = _run(hidden, weight, labels, "sum", torch.tensor(1.0))
    assert spy[path] == 1 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    truth_loss = F.cross_entropy(h32 @ w32.T, labels, reduction="sum")
    truth = (truth_loss.detach(), *torch.autograd.grad(truth_loss, (h32, w32)))
    native_loss = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    native = (native_loss.detach(), *torch.autograd.grad(native_loss, (hidden, weight)))
    for ours, torch_bf16, want in zip(got, native, truth):
        err = (ours.float() - want).abs().max()
        bar = (torch_bf16.float() - want).abs().max() + want.abs().max() * 2**-7
        assert err <= bar, (err, bar)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_filtered_three_pass_equals_reference_with_the_same_filter(monkeypatch, spy, dtype):
    """Filtering in the 3-pass path judges the same tiles with the same rule (before the 1/n of 'mean') as
    the 4-pass reference; tiles not kept must leave grad_weight rows untouched across stripes. Checks that
    some tile really was dropped. bf16 tolerance: one bf16 ulp of the largest entry (the kernel rounds
    dlogits and the per-stripe grad_weight sums to bf16, the fp32 reference does not)."""
    hidden, weight, labels = peaky_inputs(dtype)
    eps = flce_mod.FILTER_EPS_BF16
    g = torch.tensor(0.5)
    reference = _reference(monkeypatch, hidden, weight, labels, "mean", g, filter_eps=eps)
    exact = _reference(monkeypatch, hidden, weight, labels, "mean", g)
    assert (reference[2].float() != exact[2].float()).any(), "no tile was filtered: the test proves nothing"
    monkeypatch.setenv("LINGSHU_KERNELS", "triton")
    got = _run(hidden, weight, labels, "mean", g, filter_eps=eps)
    assert spy["triton"] == 1
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    for a, b in zip(got, reference):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item())


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_frozen_head_three_pass_allocates_no_weight_grad(monkeypatch, spy, path):
    """A frozen head on the scalar path: no [V, H] tensor may be created in forward (where the gradients
    are now computed) or backward, and grad_hidden equals the trainable-head run bit for bit."""
    monkeypatch.setenv("LINGSHU_KERNELS", path)
    hidden, weight, labels = flce_inputs(40, 24, 70, ignored=(4,))
    g = torch.tensor(1.5)
    want_gh = _run(hidden, weight, labels, "mean", g)[1]
    frozen = weight.detach()
    with AllocationLog() as log:
        loss = fused_linear_cross_entropy(hidden, frozen, labels, reduction="mean")
        (got_gh,) = torch.autograd.grad(loss, (hidden,), g)
    assert spy[path] == 2
    assert torch.equal(got_gh, want_gh)
    assert log.seen, "the dispatch log saw nothing: it would miss a [V, H] buffer too"
    assert not [s for s in log.seen if s[1] == tuple(weight.shape)], log.seen


def test_three_pass_is_bit_stable_across_runs_and_launch_orders(monkeypatch, spy):
    """No atomics in the 3-pass path either: grad_weight's sum over row stripes and row blocks runs in a
    fixed order, so the gradients are bit-identical run to run and for any grouping (1 = row-major,
    3 = ragged super-tiles). bf16 inputs, 3 row stripes."""
    monkeypatch.setenv("LINGSHU_KERNELS", "triton")
    hidden, weight, labels = flce_inputs(70, 24, 100, dtype=torch.bfloat16, ignored=(3,))
    runs = []
    for group in (2, 2, 1, 3):
        monkeypatch.setattr(tk, "INTERPRET_BWD", dataclasses.replace(tk.INTERPRET_BWD, group=group))
        runs.append(_run(hidden, weight, labels, "sum", torch.tensor(0.75)))
    assert spy["triton"] == 4
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_three_pass_matches_liger_flce(monkeypatch, spy, reduction):
    """The real peer: Liger's fused linear cross-entropy (its kernels interpreted), which also computes
    its gradients in forward; upstream gradient 2.5 (Liger scales by grad_output in backward too)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    monkeypatch.setenv("LINGSHU_KERNELS", "triton")
    hidden, weight, labels = flce_inputs(37, 45, 150, ignored=(2, 30))
    g = torch.tensor(2.5)
    got = _run(hidden, weight, labels, reduction, g)
    assert spy["triton"] == 1
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    liger_loss = liger_fused_linear_cross_entropy(h2, w2, labels, reduction=reduction)
    want = (liger_loss.detach(), *torch.autograd.grad(liger_loss, (h2, w2), g))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dispatch_picks_three_pass_only_for_a_scalar_loss_with_grads(monkeypatch, spy):
    """The one dispatch point: 'none' (per-token upstream gradients, the GRPO path) and no-grad calls take
    the 4-pass path; a second backward through the scalar loss is refused (its gradients were scaled in
    place) instead of returning gradients scaled twice."""
    monkeypatch.setenv("LINGSHU_KERNELS", "torch")
    hidden, weight, labels = flce_inputs(9, 16, 40)
    fused_linear_cross_entropy(hidden, weight, labels, reduction="none").sum().backward()
    with torch.no_grad():
        fused_linear_cross_entropy(hidden, weight, labels, reduction="mean")
    assert spy["torch"] == 0
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction="mean")
    assert spy["torch"] == 1
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
