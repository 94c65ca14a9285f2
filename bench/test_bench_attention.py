"""Packed variable-length attention vs padded SDPA, on one realistic mix of sample lengths.

The batch: sample lengths drawn lognormal (CPU: median e^4.6 ~ 100 tokens, sigma 0.9, clipped to
[16, 1024]; CUDA: median e^6.5 ~ 665, sigma 1.0, clipped to [16, 8192], as the planner bench) and
taken in draw order until the token budget (CPU 2,048, CUDA 16,384) is full: one packed micro-batch.
Heads: the LLM's causal GQA attention (CPU 4 query / 2 KV heads of 64; CUDA Qwen2.5-7B's 28 / 4 of 128).

Providers:
- `varlen`: `lingshu_fast.model.attention.varlen_attention(..., backend="auto")` on the packed
  [T, H, D] tensors: flash-attn or torch's varlen kernel on CUDA bf16, SDPA per segment on CPU
  (`resolved_backend` in extra_info says which ran);
- `varlen_sdpa` (CUDA only): the same call forced to the per-segment SDPA fallback;
- `padded_sdpa`: the same samples as a [B, H, longest, D] batch padded at the end, one
  `scaled_dot_product_attention(is_causal=True)` call. With right padding a causal mask already
  hides every pad key from every real query, so no extra mask is needed (which keeps the
  flash/efficient kernels eligible on CUDA): this is the best case for padding, and its cost is the
  B x longest^2 triangle instead of sum(len^2).
Passes: `fwd` (forward only, no graph) and `fwd_bwd` (forward + backward of out.sum()).
Run: `pytest bench/test_bench_attention.py --benchmark -q`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lingshu_fast.model.attention import resolve_backend, varlen_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETUP = {
    "cpu": dict(mu=4.6, sigma=0.9, max_len=1024, budget=2048, heads=4, kv_heads=2, head_dim=64,
                dtype=torch.float32, rounds=10),
    "cuda": dict(mu=6.5, sigma=1.0, max_len=8192, budget=16384, heads=28, kv_heads=4, head_dim=128,
                 dtype=torch.bfloat16, rounds=20),
}[DEVICE]
PROVIDERS = ["varlen", pytest.param("varlen_sdpa", marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="on CPU `varlen` already is the per-segment SDPA path")), "padded_sdpa"]


def draw_lengths(seed: int = 0) -> list[int]:
    """Lognormal lengths in draw order until the budget is full (the last one cut to fit)."""
    rng = np.random.default_rng(seed)
    lengths, total = [], 0
    while total < SETUP["budget"]:
        n = int(np.clip(rng.lognormal(SETUP["mu"], SETUP["sigma"]), 16, SETUP["max_len"]))
        n = min(n, SETUP["budget"] - total)
        lengths.append(n)
        total += n
    return lengths


def packed_to_padded(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[T, H, D] packed -> [B, H, longest, D], zeros after each sample."""
    longest = max(lengths)
    out = x.new_zeros(len(lengths), longest, *x.shape[1:])
    start = 0
    for b, n in enumerate(lengths):
        out[b, :n] = x[start:start + n]
        start += n
    return out.transpose(1, 2).contiguous()


def make_inputs(lengths: list[int], provider: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    total, s = sum(lengths), SETUP
    q, k, v = (torch.randn(total, h, s["head_dim"], generator=gen).to(DEVICE, s["dtype"])
               for h in (s["heads"], s["kv_heads"], s["kv_heads"]))
    if provider == "padded_sdpa":
        q, k, v = (packed_to_padded(t, lengths) for t in (q, k, v))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=DEVICE)
    return dict(q=q.requires_grad_(), k=k.requires_grad_(), v=v.requires_grad_(), cu_seqlens=cu,
                max_seqlen=max(lengths))


def attention(provider: str, inp: dict) -> torch.Tensor:
    if provider == "padded_sdpa":
        gqa = inp["q"].shape[1] != inp["k"].shape[1]
        return F.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"], is_causal=True, enable_gqa=gqa)
    backend = "sdpa" if provider == "varlen_sdpa" else "auto"
    return varlen_attention(inp["q"], inp["k"], inp["v"], inp["cu_seqlens"], inp["max_seqlen"], causal=True,
                            backend=backend)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def test_padded_matches_varlen_on_real_tokens():
    """Not timed: the padded baseline computes the same outputs on real tokens (else the comparison
    is void). fp32 (CPU): SDPA over the same rows in another layout, so 1e-5; bf16 (CUDA): different
    kernels round differently, 2e-2 (a few bf16 ulps of O(1) outputs)."""
    tol = 1e-5 if SETUP["dtype"] == torch.float32 else 2e-2
    lengths = draw_lengths()[:6]
    packed, padded = make_inputs(lengths, "varlen"), make_inputs(lengths, "padded_sdpa")
    out_packed = attention("varlen", packed).detach()
    out_padded = attention("padded_sdpa", padded).detach().transpose(1, 2)
    real = torch.cat([out_padded[b, :n] for b, n in enumerate(lengths)])
    torch.testing.assert_close(real, out_packed, atol=tol, rtol=tol)


@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_attention(benchmark, bench_info, provider, pass_):
    lengths = draw_lengths()
    inp = make_inputs(lengths, provider)
    # fwd: inputs that do not require grad, as activations in a no-grad forward are
    frozen = {**inp, **{name: inp[name].detach() for name in ("q", "k", "v")}}

    def run():
        if pass_ == "fwd":
            with torch.no_grad():
                attention(provider, frozen)
        else:
            for t in (inp["q"], inp["k"], inp["v"]):
                t.grad = None
            attention(provider, inp).float().sum().backward()
        _sync()

    run()  # warm-up outside the timer (kernel selection, allocator)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, rounds=SETUP["rounds"], iterations=1, warmup_rounds=1)
    s, longest = SETUP, max(lengths)
    real_pairs = sum(n * (n + 1) // 2 for n in lengths)  # causal (query, key) pairs actually needed
    computed_pairs = real_pairs if provider != "padded_sdpa" else len(lengths) * longest * (longest + 1) // 2
    bench_info.update(
        op="causal_attention", provider=provider, pass_=pass_, device_kind=DEVICE,
        resolved_backend="padded" if provider == "padded_sdpa" else resolve_backend(
            "sdpa" if provider == "varlen_sdpa" else "auto", torch.device(DEVICE), s["dtype"]),
        dtype=str(s["dtype"]).replace("torch.", ""), tokens=sum(lengths), segments=len(lengths),
        longest=longest, padded_slots=len(lengths) * longest, heads=s["heads"], kv_heads=s["kv_heads"],
        head_dim=s["head_dim"], pair_efficiency=round(real_pairs / computed_pairs, 4),
        best_ms=round(benchmark.stats.stats.min * 1e3, 3),
        peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3) if DEVICE == "cuda" else None,
    )
