"""The Triton kernels compiled for CUDA against their references on the CPU, with a CPU twin of each.

Every check below is one function run twice: by a `cuda` test (the kernel compiled, on CUDA tensors,
at the small shapes and at the Qwen2.5-7B head: H=3584, V=151,936) and by its CPU twin (the same
kernel under TRITON_INTERPRET=1, small shapes only: the interpreter is slow). The `cuda` tests need
`TRITON_INTERPRET=0` (tests/conftest.py skips them otherwise; bench/gpu.sh sets it). Each check counts
the Triton launches it expects, so a silent fall-back to the reference cannot pass.

Oracles and tolerances (relative error = |got - want| / |want| in the Frobenius norm):
- fused linear cross-entropy: fp32 loss and gradients from full logits with plain torch on the CPU.
  fp32 inputs: 1e-5 (IEEE dots; only the summation order differs); TF32 dots: 2e-3 (10-bit
  mantissas, errors ~3e-4 typical); bf16 inputs: Cut Cross-Entropy's bar, each output no further
  from the fp32 truth than torch's own bf16 full-logits loss is, plus one bf16 ulp of its largest value.
- GRPO loss: the op's plain-torch path on the CPU in fp32 on the same (rounded) inputs. fp32: 1e-5
  on the loss and statistics, 1e-4 on gradients (fp32 atomics); bf16: the kernel's products are
  exact and its sums fp32, but gradients come back in bf16 (2^-9 relative rounding, dlogits
  rounded before the dot; the CPU twin measures ~4e-3), so 1e-3 on the loss and statistics and
  2e-2 on the gradients. clip_frac counts tokens: one token on a clip edge may flip.
- GRPO advantages: the reference in float64 on the CPU; fp32 within 1e-5 absolute (values O(1)),
  bf16 rewards within one bf16 rounding of the result.
- image packing: exactly equal (the kernel copies values from a table the reference computes).
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

flce_mod = importlib.import_module("lingshu_fast.kernels.fused_linear_cross_entropy")
grpo_loss_mod = importlib.import_module("lingshu_fast.kernels.fused_linear_grpo_loss")
adv_mod = importlib.import_module("lingshu_fast.kernels.grpo_advantages")
pack_mod = importlib.import_module("lingshu_fast.kernels.image_pack")

HEAD_7B = (130, 3584, 151936)  # rows: two 64/128-row blocks and a ragged third
SMALL_HEADS = [(37, 45, 150), (1, 16, 40)]  # ragged tiles everywhere; one row and V under one GPU tile
# On CUDA each new (dtype, shape class) is another compile of both kernels (seconds each): the
# ragged shape in both dtypes, the one-row shape in bf16 (the training dtype), the 7B head in all three.
CUDA_FLCE_CASES = [(SMALL_HEADS[0], "fp32"), (SMALL_HEADS[0], "bf16"), (SMALL_HEADS[1], "bf16"),
                   (HEAD_7B, "fp32"), (HEAD_7B, "tf32"), (HEAD_7B, "bf16")]


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| (Frobenius), in float64 on got's device (the 7B head's grads are 545M values)."""
    got, want = got.detach().double(), want.detach().to(got.device, torch.float64)
    assert torch.isfinite(got).all(), "non-finite values"
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _head_inputs(n, h, v, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, device=device)
    weight = torch.randn(v, h, generator=gen, device=device) * (1.5 / h ** 0.5)  # logits of std ~1.5
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    labels[3::7] = -100  # ignored rows (none when N <= 3)
    grad_rows = torch.randn(n, generator=gen, device=device)  # reduction="none": a per-row upstream gradient
    return hidden.to(dtype), weight.to(dtype), labels, grad_rows


def _cpu_truth(hidden, weight, labels, grad_rows):
    """fp32 loss rows and gradients from full logits, plain torch on the CPU (the same rounded inputs)."""
    h = hidden.detach().cpu().float().requires_grad_()
    w = weight.detach().cpu().float().requires_grad_()
    loss = F.cross_entropy(h @ w.T, labels.cpu(), reduction="none")
    return (loss.detach(), *torch.autograd.grad(loss, (h, w), grad_rows.cpu()))


def check_flce(device, shape, precision, use_kernels, count_calls, monkeypatch, reduction="none"):
    """fused_linear_cross_entropy on `device`'s Triton kernels against the CPU fp32 truth. reduction='sum'
    takes the 3-pass path (gradients in forward), with an upstream gradient != 1."""
    n, h, v = shape
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device == "cuda":  # fp32 dots follow torch's setting (kernels/fused_linear_cross_entropy.py)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", precision == "tf32")
    hidden, weight, labels, grad_rows = _head_inputs(n, h, v, dtype, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    launches = [count_calls(flce_mod, name)
                for name in ("_triton_forward", "_triton_backward", "_triton_forward_with_grads")]
    upstream = grad_rows if reduction == "none" else grad_rows[0].abs() + 0.5
    use_kernels("triton")
    loss = flce_mod.fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction)
    got = (loss.detach(), *torch.autograd.grad(loss, (hidden, weight), upstream))
    expected = [1, 1, 0] if reduction == "none" else [0, 0, 1]
    assert [len(c) for c in launches] == expected, f"expected Triton launches {expected}: {launches}"
    assert got[1].dtype == dtype and got[2].dtype == dtype and got[1].device.type == device
    if reduction != "none":
        grad_rows = upstream.expand(n)
    want = _cpu_truth(hidden, weight, labels, grad_rows)
    if reduction != "none":
        want = (want[0].sum(), *want[1:])
    if precision != "bf16":
        bound = 1e-5 if precision == "fp32" else 2e-3
        for name, a, b in zip(("loss", "grad_hidden", "grad_weight"), got, want):
            assert _rel_err(a, b) <= bound, (name, _rel_err(a, b), bound)
        return
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    native_loss = F.cross_entropy(h @ w.T, labels, reduction=reduction)  # torch's own bf16, on the device
    native_up = (grad_rows if reduction == "none" else upstream).to(native_loss.dtype)
    native = (native_loss.detach(), *torch.autograd.grad(native_loss, (h, w), native_up))
    for name, ours, torch_bf16, truth in zip(("loss", "grad_hidden", "grad_weight"), got, native, want):
        truth = truth.to(ours.device)
        err = (ours.float() - truth).abs().max()
        bar = (torch_bf16.float() - truth).abs().max() + truth.abs().max() * 2 ** -7
        assert err <= bar, (name, float(err), float(bar))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SMALL_HEADS, ids=lambda s: "N{}H{}V{}".format(*s))
def test_flce_kernel_cpu_twin(shape, precision, use_kernels, count_calls, monkeypatch):
    """CPU twin of test_flce_kernel_cuda: the same check, the kernels interpreted."""
    check_flce("cpu", shape, precision, use_kernels, count_calls, monkeypatch)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_flce_three_pass_cpu_twin(precision, use_kernels, count_calls, monkeypatch):
    """CPU twin of test_flce_three_pass_cuda (the ragged small head: 37 rows cross a row stripe)."""
    check_flce("cpu", SMALL_HEADS[0], precision, use_kernels, count_calls, monkeypatch, reduction="sum")


@pytest.mark.cuda
@pytest.mark.parametrize("shape,precision", CUDA_FLCE_CASES,
                         ids=["N{}H{}V{}-{}".format(*shape, p) for shape, p in CUDA_FLCE_CASES])
def test_flce_three_pass_cuda(shape, precision, use_kernels, count_calls, monkeypatch):
    """Pins the compiled 3-pass path (scalar loss: logits kernel, in-place dlogits, accumulating dW, dE in
    the input dtype) at the production tiles and row stripes, and at shapes smaller than one tile."""
    check_flce("cuda", shape, precision, use_kernels, count_calls, monkeypatch, reduction="sum")


@pytest.mark.cuda
@pytest.mark.parametrize("shape,precision", CUDA_FLCE_CASES,
                         ids=["N{}H{}V{}-{}".format(*shape, p) for shape, p in CUDA_FLCE_CASES])
def test_flce_kernel_cuda(shape, precision, use_kernels, count_calls, monkeypatch):
    """Pins the compiled forward/backward (production tiles, vocabulary splits, fp32 atomics) at
    the 7B head and at shapes smaller than one tile, where only masking keeps loads in bounds."""
    check_flce("cuda", shape, precision, use_kernels, count_calls, monkeypatch)


def _grpo_inputs(n, h, v, dtype, device, seed=1):
    hidden, weight, labels, _ = _head_inputs(n, h, v, dtype, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    seq = torch.tensor([5, 3, 99, 12], device=device)[torch.randint(0, 4, (n,), generator=gen, device=device)]
    mask = (torch.rand(n, generator=gen, device=device) > 0.25) & (seq != 99)  # sequence 99: no masked token
    adv = torch.tensor([1.3, -0.7, 2.0, 0.4], device=device)[torch.searchsorted(
        torch.tensor([3, 5, 12, 99], device=device), seq)]
    with torch.no_grad():  # old / ref log-probs near the current ones, spread past both clip edges
        logp = -F.cross_entropy(hidden.float() @ weight.float().T, labels.clamp_min(0), reduction="none")
    old = logp + 0.4 * torch.randn(n, generator=gen, device=device)
    ref = logp + 0.3 * torch.randn(n, generator=gen, device=device)
    return hidden, weight, labels.clamp_min(0), adv, mask, seq, old, ref


def check_grpo_loss(device, shape, dtype, use_kernels, count_calls):
    """fused_linear_grpo_loss on `device`'s Triton kernels against its plain-torch path on the CPU."""
    inputs = _grpo_inputs(*shape, dtype, device)
    kw = dict(beta=0.04, clip_low=0.2, clip_high=0.28, loss_agg="seq-mean-token-mean")

    def run(hidden, weight, *rest):
        hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        labels, adv, mask, seq, old, ref = rest
        loss, stats = grpo_loss_mod.fused_linear_grpo_loss(hidden, weight, labels, adv, mask, seq,
                                                           old_logprobs=old, ref_logprobs=ref, **kw)
        return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight))), stats

    launches = (count_calls(flce_mod, "_triton_forward"), count_calls(flce_mod, "_triton_backward"))
    use_kernels("triton")
    got, got_stats = run(*inputs)
    assert [len(c) for c in launches] == [1, 1], f"expected one Triton forward and one backward: {launches}"
    use_kernels("torch")
    cpu = [t.cpu() for t in inputs]
    want, want_stats = run(cpu[0].float(), cpu[1].float(), *cpu[2:])
    value_bound, grad_bound = (1e-5, 1e-4) if dtype == torch.float32 else (1e-3, 2e-2)
    assert _rel_err(got[0], want[0]) <= value_bound, ("loss", _rel_err(got[0], want[0]))
    one_token = 1.01 / float(inputs[4].sum())  # clip_frac counts tokens: one may sit on a clip edge
    for name in want_stats:
        diff = abs(float(got_stats[name]) - float(want_stats[name]))
        bound = one_token if name == "clip_frac" else value_bound * max(1.0, abs(float(want_stats[name])))
        assert diff <= bound, (name, diff, bound)
    for name, a, b in zip(("grad_hidden", "grad_weight"), got[1:], want[1:]):
        assert a.dtype == dtype and _rel_err(a, b) <= grad_bound, (name, _rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grpo_loss_kernel_cpu_twin(dtype, use_kernels, count_calls):
    """CPU twin of test_grpo_loss_kernel_cuda (interpreted kernels, a small head)."""
    check_grpo_loss("cpu", (37, 24, 50), dtype, use_kernels, count_calls)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(37, 24, 50), HEAD_7B], ids=["small", "7b_head"])
def test_grpo_loss_kernel_cuda(shape, dtype, use_kernels, count_calls):
    """Pins the GRPO loss's per-token upstream gradient through the compiled CE backward."""
    check_grpo_loss("cuda", shape, dtype, use_kernels, count_calls)


def check_grpo_advantages(device, batch, dtype, use_kernels, count_calls):
    """grpo_advantages' Triton kernel on `device` against the float64 reference on the CPU: unsorted,
    non-contiguous group ids of mixed sizes, a lone rollout and a group of equal rewards."""
    gen = torch.Generator().manual_seed(batch)
    groups = torch.randint(0, max(2, batch // 6), (batch,), generator=gen) * 7 - 1000
    groups[0] = 10 ** 6  # a group of one: advantage 0
    groups[1:4] = 10 ** 6 + 1
    rewards = torch.rand(batch, generator=gen) * 4 - 1
    rewards[1:4] = 0.5  # std 0: advantage 0
    rewards = rewards.to(dtype)
    launches = count_calls(adv_mod, "_grpo_advantages_triton")
    use_kernels("triton")
    got = adv_mod.grpo_advantages(rewards.to(device), groups.to(device))
    assert len(launches) == 1 and got.dtype == dtype and got.device.type == device
    use_kernels("torch")
    want = adv_mod.grpo_advantages(rewards.double(), groups).to(dtype).double()
    if dtype == torch.float32:
        torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=0)
    else:  # the kernel rounds its fp32 result once; so did `want`, from a float64 value
        torch.testing.assert_close(got.double().cpu(), want, atol=1e-3, rtol=2 ** -7)
    assert got[0] == 0 and (got[1:4] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grpo_advantages_kernel_cpu_twin(dtype, use_kernels, count_calls):
    """CPU twin of test_grpo_advantages_kernel_cuda (interpreted: a small batch)."""
    check_grpo_advantages("cpu", 96, dtype, use_kernels, count_calls)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [5, 96, 8192])
def test_grpo_advantages_kernel_cuda(batch, dtype, use_kernels, count_calls):
    """Pins the compiled segment walk (groups longer than one 128-lane block at batch 8192)."""
    check_grpo_advantages("cuda", batch, dtype, use_kernels, count_calls)


PACK_SIZES = {
    "small": [(56, 84), (196, 28), (28, 28), (140, 112), (84, 252)],
    # 7B-scale images (up to 1400 px a side): byte offsets past 2^24, thousands of rows per image
    "large": [(1400, 1400), (28, 1400), (1008, 756), (476, 1204), (28, 28), (812, 1092)],
}


def check_image_pack(device, sizes, out_dtype, window_order, use_kernels, count_calls):
    """pack_images' Triton kernel on `device` equals the reference on the CPU, bit for bit."""
    gen = torch.Generator().manual_seed(len(sizes))
    flat = torch.randint(0, 256, (sum(h * w * 3 for h, w in sizes),), dtype=torch.uint8, generator=gen)
    sizes_t = torch.tensor(sizes, dtype=torch.int64)
    launches = count_calls(pack_mod, "_pack_images_triton")
    use_kernels("triton")
    got, grid = pack_mod.pack_images(flat.to(device), sizes_t, out_dtype=out_dtype, window_order=window_order)
    assert len(launches) == 1 and got.device.type == device
    want, want_grid = pack_mod.pack_images_reference(flat, sizes_t, out_dtype=out_dtype, window_order=window_order)
    assert got.dtype == out_dtype and got.shape == want.shape
    assert torch.equal(got.cpu(), want) and torch.equal(grid.cpu(), want_grid)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_image_pack_kernel_cpu_twin(out_dtype, use_kernels, count_calls):
    """CPU twin of test_image_pack_kernel_cuda (interpreted, the small images, window order)."""
    check_image_pack("cpu", PACK_SIZES["small"], out_dtype, True, use_kernels, count_calls)


@pytest.mark.cuda
@pytest.mark.parametrize("window_order", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(PACK_SIZES))
def test_image_pack_kernel_cuda(case, out_dtype, window_order, use_kernels, count_calls):
    """Pins the compiled kernel's image lookup and strides at training sizes."""
    check_image_pack("cuda", PACK_SIZES[case], out_dtype, window_order, use_kernels, count_calls)
