"""The model's CUDA paths against the CPU, with a CPU twin of each check.

Each check is one function: a `cuda` test runs it on CUDA (skipped without a GPU or under
TRITON_INTERPRET=1: tests/conftest.py), its CPU twin on the CPU. Oracles and tolerances:
- model logits (Liger RMSNorm/SwiGLU/RoPE inside, varlen attention): transformers' model on the CPU in
  fp32, per sample. fp32: 1e-4 absolute as test_model_qwen2_5_vl.py (summation order only; observed
  ~1e-6); gradients 1e-4 relative to each tensor's largest. bf16 weights and activations: 3e-2 relative
  error of the logits (Frobenius norm); the CPU twin's bf16 reference path gives ~1e-2, so this is
  the error of bf16 itself with room for CUDA's other summation order, while a wrong op is off by O(1).
- attention: softmax(QK^T/sqrt(d)) V per segment in float64 on the CPU, forward and input gradients.
  fp32 1e-5 relative; bf16 2e-2 on the output and 4e-2 on the gradients (the inputs are rounded
  first, so what remains is the kernel's bf16 probabilities and results: the CPU's bf16 SDPA gives
  2e-3 on the output and up to 8e-3 on dK/dV of the 7B GQA case, measured), while a wrong mask or
  head grouping is off by O(1).
- uint8 image transfer: exactly equal to the host-side float32 pixels (a byte -> table copy).
- greedy generation: every generated token is the CPU model's argmax given the same prefix (a full
  fp32 forward, no cache), unless the CPU's two best logits are within 1e-4 (a tie that summation
  order may break either way); the run equals the CPU generate token for token up to such a tie;
  log-probs within 1e-4.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import lingshu_fast.model as M
from lingshu_fast.data.prompt import Prompt
from lingshu_fast.model.attention import resolve_backend, varlen_attention
from lingshu_fast.model.checkpoint_io import full_hf_state_dict
from lingshu_fast.model.generate import generate
from lingshu_fast.model.shard_specs import canonical_name
from lingshu_fast.model.testing import DEFAULT_LAYOUT, hf_logits_per_sample, model_inputs, packed_batch

pack_mod = importlib.import_module("lingshu_fast.kernels.image_pack")

pytestmark = pytest.mark.usefixtures("world_of_one")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| (Frobenius), in float64 on got's device (the 7B head's grads are 545M values)."""
    got, want = got.detach().double(), want.detach().to(got.device, torch.float64)
    assert torch.isfinite(got).all(), "non-finite values"
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """transformers' tiny Qwen2.5-VL (fp32, CPU) and its saved folder."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(M.tiny_hf_config()).eval()
    folder = str(tmp_path_factory.mktemp("cuda_model") / "hf")
    hf.save_pretrained(folder)
    return hf, folder


# ---------------------------------------------------------------- the model with Liger's ops inside
LIGER_OPS = (("rms_norm", "LigerRMSNormFunction"), ("swiglu", "LigerSiLUMulFunction"), ("rope", "LigerRopeFunction"))


def _count_liger(count_calls) -> dict:
    counts = {}
    for module, cls in LIGER_OPS:
        owner = getattr(importlib.import_module(f"liger_kernel.ops.{module}"), cls)
        counts[cls] = count_calls(owner, "apply")
    return counts


def check_model_logits(device, dtype, tiny_hf, use_kernels, count_calls, *, grads: bool):
    """Our model on `device` in `dtype` against transformers on the CPU in fp32 (module docstring);
    on CUDA every Liger op must have run. Returns the logits' relative error."""
    hf, folder = tiny_hf
    use_kernels("auto")
    liger = _count_liger(count_calls) if device == "cuda" else {}
    model = M.from_pretrained(folder, dtype=dtype, device=device)
    batch = packed_batch(hf.config)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in model_inputs(batch).items()}
    out = model(**inputs, return_logits=True)
    reference = hf_logits_per_sample(hf, batch)
    cu = batch["cu_seqlens"].tolist()
    idle = [name for name, calls in liger.items() if not calls]
    assert not idle, f"Liger ops that did not run on CUDA: {idle}"
    if dtype == torch.float32:
        for i, ref in enumerate(reference):
            torch.testing.assert_close(out.logits[cu[i]:cu[i + 1]].float().cpu(), ref, atol=1e-4, rtol=0)
    err = _rel_err(out.logits, torch.cat(reference))
    assert err <= (1e-5 if dtype == torch.float32 else 3e-2), err
    if grads:
        _check_grads(hf, model, out.logits, batch)
    return err


def _check_grads(hf, model, logits, batch):
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * weights.to(logits.device)).sum().backward()
    ours = full_hf_state_dict(model, grads=True)
    hf.zero_grad(set_to_none=True)
    out = torch.cat([hf(input_ids=s["input_ids"][None], pixel_values=s["pixel_values"],
                        image_grid_thw=s["image_grid_thw"], position_ids=s["position_ids"][:, None]).logits[0]
                     for s in batch["samples"]])
    (out * weights).sum().backward()
    reference = {canonical_name(n): p.grad for n, p in hf.named_parameters()}
    hf.zero_grad(set_to_none=True)
    assert ours.keys() == reference.keys()
    for name, grad in reference.items():
        scale = grad.abs().max().item() + 1e-12
        torch.testing.assert_close(ours[name].cpu() / scale, grad / scale, atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_logits_cpu_twin(dtype, tiny_hf, use_kernels, count_calls):
    """CPU twin of test_model_logits_with_liger_cuda: the reference ops, the same bars."""
    check_model_logits("cpu", dtype, tiny_hf, use_kernels, count_calls, grads=dtype == torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_logits_with_liger_cuda(dtype, tiny_hf, use_kernels, count_calls):
    """Pins Liger's RMSNorm, SwiGLU and RoPE (rotate-half layout, [1, T, D] cos/sin, the ViT's 2-D
    rotary and the LLM's M-RoPE) and the CUDA attention inside the whole model, forward and, in
    fp32, backward."""
    check_model_logits("cuda", dtype, tiny_hf, use_kernels, count_calls, grads=dtype == torch.float32)


# ---------------------------------------------------------------- varlen attention, every backend
ATTENTION_CASES = {
    # (segment lengths (0: an empty slot, as pipeline padding makes), q heads, kv heads, head dim, causal)
    "small": ([5, 1, 0, 13, 13], 4, 2, 16, True),
    "llm_7b": ([700, 1, 301, 0, 37, 1009], 28, 4, 128, True),  # Qwen2.5-VL-7B's GQA heads
    "vit_7b": ([64, 64, 256, 16], 16, 16, 80, False),  # its ViT: windows of 64 patches, full images
}


def _attention_oracle(q, k, v, lengths, causal, grad_out):
    """Per-segment float64 attention on the CPU: (output, dq, dk, dv)."""
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        if n == 0:
            continue
        qs, ks, vs = q[start:start + n], k[start:start + n], v[start:start + n]
        ks, vs = ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1)
        scores = torch.einsum("thd,shd->hts", qs, ks) / q.shape[-1] ** 0.5
        if causal:
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        outs.append(torch.einsum("hts,shd->thd", scores.softmax(-1), vs))
        start += n
    out = torch.cat(outs)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out.cpu().double()))


def check_varlen_attention(device, backend, dtype, case):
    """varlen_attention's `backend` on `device` against the float64 oracle, forward and backward."""
    lengths, hq, hkv, dim, causal = ATTENTION_CASES[case]
    gen = torch.Generator().manual_seed(len(lengths) + dim)
    tokens = sum(lengths)
    q, k, v = (torch.randn(tokens, h, dim, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    grad_out = torch.randn(tokens, hq, dim, generator=gen).to(dtype)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    want = _attention_oracle(q, k, v, lengths, causal, grad_out)
    qd, kd, vd = (t.to(device).requires_grad_() for t in (q, k, v))
    out = varlen_attention(qd, kd, vd, cu.to(device), max(lengths), causal=causal, backend=backend)
    got = (out.detach(), *torch.autograd.grad(out, (qd, kd, vd), grad_out.to(device)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        bound = 1e-5 if dtype == torch.float32 else (2e-2 if name == "out" else 4e-2)
        assert a.dtype == dtype and _rel_err(a, b) <= bound, (name, _rel_err(a, b), bound)


@pytest.mark.parametrize("case,dtype", [("small", torch.float32), ("vit_7b", torch.float32),
                                        ("llm_7b", torch.bfloat16)], ids=["small-fp32", "vit_7b-fp32", "llm_7b-bf16"])
def test_varlen_attention_cpu_twin(case, dtype):
    """CPU twin of test_varlen_attention_cuda: the SDPA-per-segment backend."""
    check_varlen_attention("cpu", "sdpa", dtype, case)


@pytest.mark.cuda
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
@pytest.mark.parametrize("backend,dtype", [("sdpa", torch.float32), ("sdpa", torch.bfloat16),
                                           ("varlen", torch.bfloat16), ("flash", torch.bfloat16),
                                           ("auto", torch.bfloat16)], ids=["sdpa-fp32", "sdpa-bf16", "varlen-bf16",
                                                                           "flash-bf16", "auto-bf16"])
def test_varlen_attention_cuda(backend, dtype, case):
    """Pins every CUDA backend (empty and one-token segments, GQA, causal and not, head dims 16, 80,
    128). `auto` must pick a fused kernel for bf16: torch >= 2.10 always has `varlen`."""
    if backend == "flash":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed (an optional extra)")
    if backend == "auto":
        assert resolve_backend("auto", torch.device("cuda"), dtype) in ("flash", "varlen")
    check_varlen_attention("cuda", backend, dtype, case)


# ---------------------------------------------------------------- uint8 images, packed on the device
def check_uint8_transfer(device, tmp_path, use_kernels, count_calls):
    """The loader ships resized bytes (data.image_transfer=uint8); `MicroBatch.to(device)` packs them
    there, through the Triton kernel, into exactly the host path's float32 pixels (bf16 too)."""
    from lingshu_fast.config import DataConfig
    from lingshu_fast.data.demo_data import build_demo_dataset
    from lingshu_fast.data.loader import PackedLoader
    from lingshu_fast.data.tokenizer import load_tokenizer

    data = build_demo_dataset(tmp_path / "demo")
    tokenizer = load_tokenizer("tiny")

    def loader(**kw):
        cfg = DataConfig(train=[str(data["instruct"])], max_pixels=84 * 84, max_tokens_per_microbatch=160,
                         max_length=160, shuffle_window=64, **kw)
        return PackedLoader([str(data["instruct"])], tokenizer, cfg, seed=5, epochs=1)

    assert loader()._ship_uint8 == torch.cuda.is_available(), "data.image_transfer=auto ships bytes on CUDA hosts"
    # CUDA: auto (the host path's CPU pack stays on the reference); CPU: the kernel interpreted
    use_kernels("auto" if device == "cuda" else "triton")
    launches = count_calls(pack_mod, "_pack_images_triton")
    with_images = device_launches = 0
    for host, ship in zip(loader(image_transfer="float32"), loader(image_transfer="uint8")):
        if host.pixel_values is None:
            continue
        if with_images == 4:  # enough batches of mixed image sizes; the interpreter is slow
            break
        with_images += 1
        assert ship.pixel_values is None and ship.image_uint8.dtype == torch.uint8
        before = len(launches)
        moved = ship.pin_memory().to(device)  # the trainer's async copy of pinned bytes
        device_launches += len(launches) - before
        assert moved.image_uint8 is None and moved.pixel_values.device.type == device
        assert torch.equal(moved.pixel_values.cpu(), host.pixel_values)
        assert torch.equal(moved.image_grid_thw.cpu(), host.image_grid_thw)
        half = ship.to(device, pixel_dtype=torch.bfloat16).pixel_values
        assert half.dtype == torch.bfloat16 and torch.equal(half.cpu(), host.pixel_values.to(torch.bfloat16))
    assert with_images > 0 and device_launches == with_images, "the device-side pack did not run the kernel"


def test_uint8_transfer_cpu_twin(tmp_path, use_kernels, count_calls):
    """CPU twin of test_uint8_transfer_cuda (the kernel interpreted)."""
    check_uint8_transfer("cpu", tmp_path, use_kernels, count_calls)


@pytest.mark.cuda
def test_uint8_transfer_cuda(tmp_path, use_kernels, count_calls):
    """Pins the uint8 path end to end on the GPU: pinned bytes, non-blocking copy, compiled pack."""
    check_uint8_transfer("cuda", tmp_path, use_kernels, count_calls)


# ---------------------------------------------------------------- greedy generation
def _teacher_forced_logits(model, prompt: Prompt, tokens: list[int]) -> torch.Tensor:
    """CPU logits predicting each of `tokens` from one full forward of prompt + tokens (no cache)."""
    ids = torch.cat([prompt.input_ids, torch.tensor(tokens)])
    start = int(prompt.position_ids.max()) + 1
    pos = torch.cat([prompt.position_ids, torch.arange(start, start + len(tokens)).expand(3, -1)], dim=1)
    cu = torch.tensor([0, ids.shape[0]], dtype=torch.int32)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos, cu_seqlens=cu, pixel_values=prompt.pixel_values,
                       image_grid_thw=prompt.image_grid_thw, return_logits=True).logits
    t = prompt.input_ids.shape[0]
    return logits[t - 1:t - 1 + len(tokens)].float()


def check_greedy(device, tiny_hf, use_kernels, *, new_tokens=12, tie=1e-4):
    """Greedy generation (KV cache) on `device` against the CPU model (module docstring)."""
    hf, folder = tiny_hf
    use_kernels("auto")
    prompts = [Prompt(s["input_ids"], s["position_ids"], s["pixel_values"], s["image_grid_thw"])
               for s in packed_batch(hf.config, DEFAULT_LAYOUT + (([], 4),))["samples"]]
    cpu_model = M.from_pretrained(folder).eval()
    cpu_runs = generate(cpu_model, prompts, max_new_tokens=new_tokens, stop_token_ids=[])
    runs = generate(M.from_pretrained(folder, device=device).eval(), prompts, max_new_tokens=new_tokens,
                    stop_token_ids=[])
    for prompt, run, cpu_run in zip(prompts, runs, cpu_runs):
        assert len(run.token_ids) == new_tokens
        logits = _teacher_forced_logits(cpu_model, prompt, run.token_ids)
        top2 = logits.topk(2, dim=-1).values
        near_tie = (top2[:, 0] - top2[:, 1]) < tie
        chosen = logits.gather(1, torch.tensor(run.token_ids)[:, None])[:, 0]
        assert bool(((chosen == top2[:, 0]) | near_tie).all()), "a token that is not the CPU model's argmax"
        logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(run.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(run.logprobs), logprobs, atol=1e-4, rtol=0)
        first_tie = int(near_tie.nonzero()[0]) if near_tie.any() else new_tokens
        assert run.token_ids[:first_tie] == cpu_run.token_ids[:first_tie]


def test_greedy_generation_cpu_twin(tiny_hf, use_kernels):
    """CPU twin of test_greedy_generation_cuda: here the cached decode against the full recompute."""
    check_greedy("cpu", tiny_hf, use_kernels)


@pytest.mark.cuda
def test_greedy_generation_cuda(tiny_hf, use_kernels):
    """Pins the CUDA decode (KV cache rows, SDPA with a padding mask, M-RoPE decode positions,
    compaction) against the CPU run, token for token."""
    check_greedy("cuda", tiny_hf, use_kernels)
