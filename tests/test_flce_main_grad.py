"""Gradient-accumulation fusion of the fused cross-entropy (`main_grad`): the head's weight gradient is
added into the trainer's main gradient by the dW kernel instead of being returned through autograd.

Both paths (3-pass: added in forward for a scalar loss; 4-pass: in backward, per-token upstream
gradients), both implementations (plain PyTorch; the Triton kernels under the interpreter). The oracle
is the unfused op: main_grad must end as its old content + the unfused grad_weight, grad_hidden must
not change, no [V, H] tensor may be allocated, and the grad buffers must see the gradient's arrival
(their bucket then reduces during the backward, as a hook-fed one does).
"""
import pytest
import torch
import torch.distributed as dist
from flce_cases import AllocationLog, flce_inputs

from lingshu_fast.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from lingshu_fast.parallel.spawn import spawn

PATHS = ["torch", "triton"]


def _upstream(n, reduction):
    return torch.tensor(1.0) if reduction != "none" else torch.linspace(-1.0, 2.0, n)


def _unfused(hidden, weight, labels, reduction, **kw):
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, **kw)
    gh, gw = torch.autograd.grad(loss, (hidden, weight), _upstream(hidden.shape[0], reduction))
    return loss.detach(), gh, gw


def _fused(hidden, weight, labels, reduction, main_grad, **kw):
    calls = []
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, main_grad=main_grad,
                                      on_main_grad=lambda: calls.append(1), **kw)
    assert not calls, "announced before the backward: the bucket could reduce before anything is in"
    loss.backward(_upstream(hidden.shape[0], reduction))
    assert calls == [1]
    assert weight.grad is None, "the weight's gradient went through autograd as well"
    return loss.detach(), hidden.grad


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_fp32_main_grad_gets_exactly_the_unfused_gradient(monkeypatch, path, reduction):
    """N=37 crosses the interpreter's row stripes (3-pass) and, with V=150, its vocabulary stripes (4-pass);
    z-loss and smoothing on, ignored rows. main_grad starts non-zero: the op must ADD (a kernel that
    overwrote it would drop the earlier micro-batches)."""
    monkeypatch.setenv("LINGSHU_KERNELS", path)
    hidden, weight, labels = flce_inputs(37, 45, 150, ignored=(3, 17))
    kw = dict(z_loss_weight=1e-2, label_smoothing=0.1)
    want_loss, want_gh, want_gw = _unfused(hidden, weight, labels, reduction, **kw)
    before = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
    main_grad = before.clone()
    got_loss, got_gh = _fused(hidden, weight, labels, reduction, main_grad, **kw)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_gh, want_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(main_grad - before, want_gw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_bf16_head_adds_fp32_sums_into_an_fp32_main_grad(monkeypatch, path, reduction):
    """The trainer's case: bf16 weights, fp32 main gradients. The fused add keeps fp32 sums all the way
    (the unfused op rounds grad_weight to bf16 first, once per 3-pass row stripe), so it must sit no
    further from the fp32 truth than the unfused bf16 gradient does."""
    monkeypatch.setenv("LINGSHU_KERNELS", path)
    hidden, weight, labels = flce_inputs(70, 32, 100, ignored=(5,))
    truth = _unfused(hidden, weight, labels, reduction)[2]
    h16, w16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    unfused = _unfused(h16, w16, labels, reduction)[2].float()
    main_grad = torch.zeros(weight.shape)
    _fused(h16, w16, labels, reduction, main_grad)
    err_fused, err_unfused = (main_grad - truth).abs().max(), (unfused - truth).abs().max()
    assert err_fused <= err_unfused + 1e-6, (err_fused, err_unfused)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_main_grad_is_accumulated_in_the_weight_dtype(monkeypatch, path):
    """optim.grad_accumulation_dtype=param: a bf16 main gradient takes the sum rounded once per add."""
    monkeypatch.setenv("LINGSHU_KERNELS", path)
    hidden, weight, labels = flce_inputs(40, 32, 100, dtype=torch.bfloat16)
    want = _unfused(hidden, weight, labels, "sum")[2].float()
    main_grad = torch.zeros(weight.shape, dtype=torch.bfloat16)
    _fused(hidden, weight, labels, "sum", main_grad)
    torch.testing.assert_close(main_grad.float(), want, rtol=2**-6, atol=2**-6 * want.abs().max().item())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_no_weight_sized_tensor_is_allocated(monkeypatch, path, reduction):
    """The point of the fusion: neither path creates a [V, H] tensor (no grad_weight, no fp32 copy)."""
    monkeypatch.setenv("LINGSHU_KERNELS", path)
    hidden, weight, labels = flce_inputs(40, 24, 70, ignored=(4,))
    main_grad = torch.zeros(weight.shape)
    with AllocationLog() as log:
        loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, main_grad=main_grad)
        loss.backward(_upstream(40, reduction))
    assert log.seen, "the dispatch log saw nothing: it would miss a [V, H] buffer too"
    assert not [s for s in log.seen if s[1] == tuple(weight.shape)], log.seen
    assert main_grad.abs().sum() > 0


def test_scalar_loss_backwarded_with_another_gradient_is_refused(monkeypatch):
    """The 3-pass add happens in forward, for an upstream gradient of 1: anything else is an error, not
    a silently mis-scaled main gradient."""
    monkeypatch.setenv("LINGSHU_KERNELS", "torch")
    hidden, weight, labels = flce_inputs(9, 16, 40)
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction="sum", main_grad=torch.zeros(40, 16))
    with pytest.raises(RuntimeError, match="gradient 1"):
        (loss * 0.5).backward()


def test_bad_main_grad_arguments_are_clear_errors():
    hidden, weight, labels = flce_inputs(9, 16, 40)
    cases = [
        (dict(main_grad=torch.zeros(40, 15)), "contiguous \\(40, 16\\)"),
        (dict(main_grad=torch.zeros(16, 40).T), "contiguous"),
        (dict(main_grad=torch.zeros(40, 16, dtype=torch.float64)), "fp32 or the weight's dtype"),
        (dict(on_main_grad=lambda: None), "without main_grad"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            fused_linear_cross_entropy(hidden, weight, labels, **kw)
    with pytest.raises(ValueError, match="frozen head"):
        fused_linear_cross_entropy(hidden, weight.detach(), labels, main_grad=torch.zeros(40, 16))


def _overlap_worker(dims):
    """Two DP ranks, a trunk + an untied head in grad buffers, the head's bucket first (backward order);
    per (reduction, fused): whether the head's bucket launched during the backward, and the reduced main
    gradients of the head and the trunk."""
    from lingshu_fast.parallel.grad_buffer import GradBuffers

    rank, out = dist.get_rank(), {}
    for reduction in ("sum", "none"):
        for fused in (True, False):
            torch.manual_seed(0)
            trunk = torch.nn.Linear(16, 16)
            head = torch.nn.Parameter(torch.randn(40, 16) * 0.3)
            buffers = GradBuffers([head, trunk.weight, trunk.bias], dp_group=dist.group.WORLD, bucket_numel=600)
            buffers.zero()
            hidden_in, _, labels = flce_inputs(12, 16, 40, seed=10 + rank)
            buffers.start_last_backward()
            kw = dict(main_grad=head.main_grad, on_main_grad=head.main_grad_added) if fused else {}
            loss = fused_linear_cross_entropy(trunk(hidden_in.detach()), head, labels, reduction=reduction, **kw)
            loss.backward(_upstream(12, reduction))
            launched_in_backward = buffers.buckets[0].work is not None
            buffers.finish()
            out[reduction, fused] = (launched_in_backward, head.main_grad.clone(), trunk.weight.main_grad.clone())
    return out


def test_grad_buffers_reduce_the_fused_head_during_backward(monkeypatch):
    """`on_main_grad=param.main_grad_added` counts as the gradient's arrival: the head's bucket (first in
    backward order) launches its DP reduction during the backward, as a hook-fed one does (without the
    call it would wait for `finish`, and every later bucket behind it), and the reduced main gradients
    equal the unfused run's; both paths (3-pass 'sum', 4-pass 'none')."""
    monkeypatch.setenv("LINGSHU_KERNELS", "torch")
    ranks = spawn(_overlap_worker, 2)
    for reduction in ("sum", "none"):
        for out in ranks:
            (launched, head_f, trunk_f), (launched_plain, head_p, trunk_p) = out[reduction, True], out[reduction, False]
            assert launched and launched_plain, reduction
            torch.testing.assert_close(head_f, head_p, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(trunk_f, trunk_p, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ranks[0][reduction, True][1], ranks[1][reduction, True][1])  # reduced: the sum


def _model_step(tied: bool, fuse: bool):
    """The real model (tiny widths) in grad buffers, one micro-batch through the runner's SFT loss:
    (head fusion keywords, every parameter's main gradient after `finish`)."""
    import lingshu_fast.model as M
    from lingshu_fast.model.testing import model_inputs, packed_batch
    from lingshu_fast.train.optim import build_optimizer
    from lingshu_fast.train.runner import LocalRunner
    from lingshu_fast.train.step import LossOptions, lm_loss_sum

    config = M.tiny_hf_config(tie_word_embeddings=tied)
    model = M.build_model(config, seed=5)
    opt = build_optimizer(M.param_groups(model), _optim_cfg(), dp_group=None, model=model)
    runner = LocalRunner(model, None)
    fusion = runner.head_grad_fusion()
    batch = packed_batch(config)
    opt.buffers.zero()
    opt.buffers.start_last_backward()
    hidden = model(**model_inputs(batch)).hidden_states
    loss = lm_loss_sum(hidden, runner.lm_head_weight, torch.roll(batch["input_ids"], -1), None, LossOptions(),
                       fusion if fuse else None)
    loss.backward()
    pending = [b for b in opt.buffers.buckets if b.pending]
    opt.buffers.finish()
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return fusion, grads, pending, model


def _optim_cfg():
    from lingshu_fast.config import OptimConfig

    return OptimConfig(lr=1e-3, warmup_steps=0)


@pytest.mark.parametrize("tied", [False, True])
def test_runner_fuses_the_head_into_its_main_grad(monkeypatch, tied):
    """The trainer's wiring: the runner hands the head's main gradient to the loss, with the arrival
    announced by the kernel for an untied head and left to the embedding's hook for a tied one (whose
    gradient is not complete until the embedding's backward); every main gradient equals the unfused
    run's, and no bucket is left waiting for `finish`."""
    monkeypatch.setenv("LINGSHU_KERNELS", "torch")
    fusion, fused, pending, model = _model_step(tied, True)
    head = model.lm_head_weight
    assert model.lm_head_is_embedding == tied
    assert fusion["main_grad"] is head.main_grad
    assert fusion["on_main_grad"] is None if tied else fusion["on_main_grad"] == head.main_grad_added
    assert not pending
    _, plain, _, _ = _model_step(tied, False)
    assert fused.keys() == plain.keys()
    for name, want in plain.items():
        torch.testing.assert_close(fused[name], want, rtol=1e-5, atol=1e-7, msg=name)


def test_train_loss_filter_eps_reaches_the_fused_loss(monkeypatch):
    """train.loss_filter_eps -> LossOptions.filter_eps -> the op's gradient filter: the stage loss's
    gradients equal the op's with the same filter and differ from the unfiltered ones (the inputs have
    tiles that the filter drops)."""
    from flce_cases import peaky_inputs

    from lingshu_fast.config import load_config
    from lingshu_fast.train.step import LossOptions, lm_loss_sum

    monkeypatch.setenv("LINGSHU_KERNELS", "torch")
    eps = load_config("tiny-sft", ["train.loss_filter_eps=0.000244140625"]).train.loss_filter_eps
    hidden, weight, labels = peaky_inputs(torch.float32)
    got = torch.autograd.grad(lm_loss_sum(hidden, weight, labels, None, LossOptions(filter_eps=eps)), (hidden,))[0]
    want = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, labels, reduction="sum", filter_eps=eps),
                               (hidden,))[0]
    exact = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, labels, reduction="sum"), (hidden,))[0]
    assert torch.equal(got, want)
    assert not torch.equal(got, exact)
