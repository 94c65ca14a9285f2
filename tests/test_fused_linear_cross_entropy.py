"""fused_linear_cross_entropy: both paths (torch reference, Triton kernels under TRITON_INTERPRET) against
torch's F.cross_entropy on full logits, Liger's FLCE, and Megatron-Core's vocab_parallel_cross_entropy.

Tolerances: fp32 paths accumulate in fp32 like torch but in another order, so ~1e-5 relative; bf16 uses
Cut Cross-Entropy's bar: |ours - fp32 truth| <= |torch native bf16 - fp32 truth| + small tol.
Shapes stay tiny (the interpreter is slow); the interpreter's tiles are 16x32x16, so H=45 and V=150 span
ragged tiles, V=20 is smaller than one tile, and N=1 is a single partial row block.
"""
import dataclasses
import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from flce_cases import AllocationLog, flce_inputs, peaky_inputs

from lingshu_fast.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from lingshu_fast.parallel.spawn import spawn

PATHS = ("torch", "triton")
# By module path: kernels/__init__ re-exports a function of the same name as this module.
flce_mod = importlib.import_module("lingshu_fast.kernels.fused_linear_cross_entropy")
tk = importlib.import_module("lingshu_fast.kernels._flce_triton")


def _truth(hidden, weight, labels, reduction, grad_out, z_loss_weight=0.0, label_smoothing=0.0):
    """fp32 full-logits loss and grads with torch (the oracle)."""
    h = hidden.detach().float().requires_grad_()
    w = weight.detach().float().requires_grad_()
    logits = h @ w.T
    loss = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    loss = loss + z_loss_weight * torch.where(labels != -100, torch.logsumexp(logits, 1) ** 2, 0.0)
    loss = _reduce(loss, labels, reduction)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w), grad_out))


def _reduce(loss_rows, labels, reduction):
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / (labels != -100).sum().clamp(min=1)


def _ours(hidden, weight, labels, reduction, grad_out, **kw):
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, **kw)
    grads = torch.autograd.grad(loss, (hidden, weight), grad_out, allow_unused=False)
    return (loss.detach(), *grads)


def _grad_out(n, reduction, seed=1):
    # reduction="none": a non-uniform, signed upstream gradient (what the GRPO loss sends back).
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) if reduction == "none" else torch.tensor(1.0)


CASES = [  # (N, H, V, ignored rows)
    (1, 16, 40, ()),
    (37, 45, 150, (3, 17)),
    (8, 24, 20, (0,)),  # V smaller than one vocabulary tile
    (64, 64, 300, tuple(range(0, 64, 5))),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}H{c[1]}V{c[2]}")
def test_fp32_matches_full_logits_torch(monkeypatch, path, reduction, case):
    """Pins the forward lse/target maths, the masks of ragged tiles and the per-row upstream gradient
    (reduction='none' with a random grad_out catches a backward that assumes a uniform gradient)."""
    monkeypatch.setenv("LINGSHU_KERNELS", path)
    n, h, v, ignored = case
    hidden, weight, labels = flce_inputs(n, h, v, ignored=ignored)
    g = _grad_out(n, reduction)
    got = _ours(hidden, weight, labels, reduction, g)
    want = _truth(hidden, weight, labels, reduction, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fp32_matches_liger_flce(monkeypatch, path, reduction):
    """The real peer: Liger's fused linear cross-entropy (its Triton kernels under the interpreter)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    monkeypatch.setenv("LINGSHU_KERNELS", path)
    hidden, weight, labels = flce_inputs(37, 45, 150, ignored=(2, 30))
    g = torch.tensor(1.0)
    got = _ours(hidden, weight, labels, reduction, g)
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    liger_loss = liger_fused_linear_cross_entropy(h2, w2, labels, reduction=reduction)
    want = (liger_loss.detach(), *torch.autograd.grad(liger_loss, (h2, w2)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_all_ignored_gives_zero_loss_and_zero_grads(monkeypatch, path):
    """'mean' over zero valid labels must be 0 (not 0/0 = NaN), and so must every gradient."""
    monkeypatch.setenv("LINGSHU_KERNELS", path)
    hidden, weight, labels = flce_inputs(9, 20, 50, ignored=range(9))
    for reduction in ("mean", "sum", "none"):
        loss, gh, gw = _ours(hidden, weight, labels, reduction, _grad_out(9, reduction))
        assert torch.all(loss == 0) and torch.all(gh == 0) and torch.all(gw == 0)


@pytest.mark.parametrize("path", PATHS)
def test_z_loss_and_label_smoothing(monkeypatch, path):
    """Smoothing as torch defines it (eps spread over all V classes) plus the PaLM z-loss z*lse^2:
    the extra dlogits terms (-eps/V, 2 z lse p) are easy to get wrong on masked columns."""
    monkeypatch.setenv("LINGSHU_KERNELS", path)
    hidden, weight, labels = flce_inputs(21, 40, 100, ignored=(4,))
    g = _grad_out(21, "none")
    kw = dict(z_loss_weight=1e-2, label_smoothing=0.1)
    got = _ours(hidden, weight, labels, "none", g, **kw)
    want = _truth(hidden, weight, labels, "none", g, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_meets_cce_bar(monkeypatch, path):
    """bf16 inputs: each output must be at least as close to the fp32 truth (same bf16 inputs, fp32
    maths) as torch's native bf16 full-logits cross-entropy is, plus one bf16 ulp at the output's largest
    magnitude: grads are returned in bf16 (half an ulp of rounding alone) and dlogits are rounded to bf16
    before the tensor-core dot, as the GPU kernel must."""
    monkeypatch.setenv("LINGSHU_KERNELS", path)
    hidden, weight, labels = flce_inputs(48, 64, 300, dtype=torch.bfloat16, ignored=(1, 7))
    g = torch.tensor(1.0)
    got = _ours(hidden, weight, labels, "sum", g)
    want = _truth(hidden, weight, labels, "sum", g)
    native_loss = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    native = (native_loss.detach(), *torch.autograd.grad(native_loss, (hidden, weight)))
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for ours, torch_bf16, truth in zip(got, native, want):
        err = (ours.float() - truth).abs().max()
        bar = (torch_bf16.float() - truth).abs().max() + truth.abs().max() * 2**-7
        assert err <= bar, (err, bar)


def test_triton_production_tiles_under_interpreter(monkeypatch):
    """The GPU tiles (128 rows x 128 vocab, 64-wide H steps, 128-wide grad tiles) on a shape far smaller
    than one tile: every load and store must be masked, which the small interpreter tiles of the other
    tests do not prove."""
    monkeypatch.setenv("LINGSHU_KERNELS", "triton")
    monkeypatch.setattr(tk, "INTERPRET_FWD", tk.FWD_CONFIGS[("16bit", 90)])
    monkeypatch.setattr(tk, "INTERPRET_BWD", tk.BWD_CONFIGS[("16bit", 90)])
    hidden, weight, labels = flce_inputs(5, 30, 70, ignored=(2,))
    g = _grad_out(5, "none")
    for a, b in zip(_ours(hidden, weight, labels, "none", g), _truth(hidden, weight, labels, "none", g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_filter_rule_drops_whole_tiles_below_eps():
    """CCE's rule on the tile grid: a tile goes only when EVERY entry is below eps; one entry at eps keeps
    the whole tile (an element-wise filter, the old behaviour, would zero the small entries too)."""
    d = torch.full((5, 7), 1e-4)
    d[3, 6] = 2e-3  # the ragged bottom-right tile (rows 4.., cols 4..) stays below; this one is kept
    got = flce_mod.filter_tiles_(d.clone(), 4, 4, 1e-3)
    want = torch.zeros(5, 7)
    want[:4, 4:] = d[:4, 4:]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_filter_triton_equals_reference_with_the_same_filter(monkeypatch, dtype):
    """Filtering is an approximation, so its oracle is the reference with the same filter on the same
    tiles (not the exact gradient). Pins: the kernel's tile rule, the judgement before the upstream scale
    (reduction='mean' scales g to 1/n; judging g-scaled values would drop every tile), and that some
    tiles really were dropped (else the test could pass with the filter off). Tolerance: fp32 as the
    exact tests; bf16: the kernel rounds dlogits to bf16 before its dots (as on the GPU) and the fp32
    reference does not, so one bf16 ulp (2**-7 relative) of the output's largest entry."""
    hidden, weight, labels = peaky_inputs(dtype)
    g = torch.tensor(1.0)
    eps = flce_mod.FILTER_EPS_BF16
    runs = {}
    for path, path_eps in (("triton", eps), ("torch", eps), ("torch", 0.0)):
        monkeypatch.setenv("LINGSHU_KERNELS", path)
        runs[(path, path_eps)] = _ours(hidden, weight, labels, "mean", g, filter_eps=path_eps)
    filtered, reference, exact = runs[("triton", eps)], runs[("torch", eps)], runs[("torch", 0.0)]
    assert (reference[2].float() != exact[2].float()).any(), "no tile was filtered: the test proves nothing"
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    for a, b in zip(filtered, reference):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item())


def test_backward_is_bit_stable_across_runs_and_launch_orders(monkeypatch):
    """No atomics: every sum in the backward runs in a fixed order inside one program, so the gradients
    are bit-identical run to run and under any grouping of the launch order (group 1 = row-major,
    3 = ragged super-tiles). bf16 inputs, the path training takes."""
    monkeypatch.setenv("LINGSHU_KERNELS", "triton")
    hidden, weight, labels = flce_inputs(37, 24, 100, dtype=torch.bfloat16, ignored=(3,))  # 3 row blocks, 4 tiles
    g = _grad_out(37, "none")
    runs = []
    for group in (2, 2, 1, 3):
        monkeypatch.setattr(tk, "INTERPRET_BWD", dataclasses.replace(tk.INTERPRET_BWD, group=group))
        runs.append(_ours(hidden, weight, labels, "none", g))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_frozen_head_computes_and_allocates_no_weight_grad(monkeypatch, path):
    """A frozen head (stage 1, the reference model) must not pay for grad_weight: no [V, H] tensor of any
    dtype may be created in the backward (the weight itself is fp32 here, so the reference's fp32 view
    of it is no copy), and grad_hidden must equal the trainable-head run bit for bit."""
    monkeypatch.setenv("LINGSHU_KERNELS", path)
    hidden, weight, labels = flce_inputs(21, 24, 70, ignored=(4,))
    g = _grad_out(21, "none")
    (want_gh, _) = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, labels, reduction="none"),
                                       (hidden, weight), g)
    frozen = weight.detach()
    loss = fused_linear_cross_entropy(hidden, frozen, labels, reduction="none")
    with AllocationLog() as log:
        (got_gh,) = torch.autograd.grad(loss, (hidden,), g)
    assert torch.equal(got_gh, want_gh)
    assert log.seen, "the dispatch log saw nothing: it would miss a [V, H] buffer too"
    assert not [s for s in log.seen if s[1] == tuple(weight.shape)], log.seen


@pytest.mark.parametrize("path", PATHS)
def test_strided_hidden_frozen_weight_and_temperature(monkeypatch, path):
    """A column-sliced (non-contiguous) hidden, a frozen weight (no grad_weight asked) and a temperature
    applied by the caller (hidden / T): the kernel's stride handling and needs_input_grad plumbing."""
    monkeypatch.setenv("LINGSHU_KERNELS", path)
    base = torch.randn(13, 70, generator=torch.Generator().manual_seed(3)).requires_grad_()
    weight = torch.randn(90, 35, generator=torch.Generator().manual_seed(4)) * 0.3
    labels = torch.randint(0, 90, (13,), generator=torch.Generator().manual_seed(5))
    temperature = 0.7
    g = _grad_out(13, "none")
    loss = fused_linear_cross_entropy(base[:, ::2] / temperature, weight, labels, reduction="none")
    (grad,) = torch.autograd.grad(loss, (base,), g)
    want = F.cross_entropy(base[:, ::2] / temperature @ weight.T, labels, reduction="none")
    (want_grad,) = torch.autograd.grad(want, (base,), g)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5)


def test_clear_errors():
    """Out-of-vocabulary labels would otherwise give a silent target logit of 0 (a wrong loss)."""
    hidden, weight, labels = flce_inputs(4, 8, 10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="share H"):
        fused_linear_cross_entropy(hidden, weight[:, :4], labels)


def _tp_worker(dims, hidden, weight, labels, grad_rows):
    """Each rank: its contiguous vocab shard; ours (both paths) and Megatron-Core's peer."""
    from megatron.core import parallel_state, tensor_parallel

    group = parallel_state.get_tensor_model_parallel_group()
    rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    v_local = weight.shape[0] // world
    shard = weight[rank * v_local:(rank + 1) * v_local]
    out = {}
    for path in PATHS:
        os.environ["LINGSHU_KERNELS"] = path
        h, w = hidden.clone().requires_grad_(), shard.clone().requires_grad_()
        loss = fused_linear_cross_entropy(h, w, labels, reduction="none", tp_group=group)
        out[path] = (loss.detach(), *torch.autograd.grad(loss, (h, w), grad_rows))
        h, w = hidden.clone().requires_grad_(), shard.clone().requires_grad_()
        mean = fused_linear_cross_entropy(h, w, labels, tp_group=group, z_loss_weight=1e-2, label_smoothing=0.1)
        out[path + "_mean"] = (mean.detach(), *torch.autograd.grad(mean, (h, w)))
    valid = labels != -100
    h, w = hidden.clone().requires_grad_(), shard.clone().requires_grad_()
    mega = tensor_parallel.vocab_parallel_cross_entropy((h @ w.T)[valid].unsqueeze(1), labels[valid].unsqueeze(1))
    gh, gw = torch.autograd.grad(mega.squeeze(1), (h, w), grad_rows[valid])
    torch.distributed.all_reduce(gh, group=group)  # what ColumnParallelLinear's backward would add
    out["megatron"] = (mega.squeeze(1).detach(), gh, gw)
    return out


@pytest.mark.dist
def test_tp2_equals_tp1_and_megatron():
    """Vocab-parallel over 2 gloo ranks: the loss, the all-reduced grad_hidden and each rank's weight
    shard grad must equal TP=1 (our reference path) and Megatron-Core's vocab_parallel_cross_entropy
    on the sharded logits. One spawn for both paths and both checks (each spawn costs ~8 s)."""
    n, h, v = 24, 32, 130  # V/2 = 65 per rank: ragged against the 32-wide interpreter tile
    hidden, weight, labels = flce_inputs(n, h, v, ignored=(5, 11))
    hidden, weight = hidden.detach(), weight.detach()
    labels[3], labels[4] = 64, 65  # the last id of rank 0's shard and the first of rank 1's
    grad_rows = _grad_out(n, "none")
    results = spawn(_tp_worker, 2, hidden, weight, labels, grad_rows, tp=2)
    one = _truth(hidden, weight, labels, "none", grad_rows)
    one_mean = _truth(hidden, weight, labels, "mean", torch.tensor(1.0), z_loss_weight=1e-2, label_smoothing=0.1)
    valid = labels != -100
    for rank, res in enumerate(results):
        rows = slice(rank * v // 2, (rank + 1) * v // 2)
        for path in PATHS:
            for got, want in ((res[path], one), (res[path + "_mean"], one_mean)):
                torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got[2], want[2][rows], rtol=1e-5, atol=1e-5)
            loss, gh, gw = res[path]
            mega_loss, mega_gh, mega_gw = res["megatron"]
            torch.testing.assert_close(loss[valid], mega_loss, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gh, mega_gh, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gw, mega_gw, rtol=1e-5, atol=1e-5)
