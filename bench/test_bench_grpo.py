"""GRPO loss, forward + backward: lingshu_fast's fused_linear_grpo_loss vs Liger's
LigerFusedLinearGRPOLoss vs a plain-torch full-logits reference, side by side (time and peak memory).

Shapes: on CUDA, Liger's own GRPO benchmark shape (B=16 sequences of T=1024, H=4096, V=128,256, bf16,
N=16,384 tokens); on CPU a small fp32 one (B=4, T=512, H=512, V=32,768). The issue's GPU targets:
peak memory <= Liger's and time <= 0.66x Liger's.

All three run the same off-policy step: old and reference log-probs given, beta 0.04, clip 0.2/0.28,
temperature 1, token-mean (Liger's "bnpo"), hidden and weight both requiring grad; their losses are
checked to agree before timing. Peak memory: on CUDA `max_memory_allocated` growth over the inputs;
on CPU the peak-RSS growth (VmHWM after /proc/self/clear_refs) of one step in a FRESH subprocess, since
a process that already ran a step keeps freed pages and would under-report. Liger runs uncompiled on
CPU (torch.compile there needs a C++ toolchain and minutes) and compiled on CUDA, its default.
Run: `pytest bench/test_bench_grpo.py --benchmark` (the flag comes from bench/conftest.py).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

SHAPES = {
    "cpu": dict(batch=4, seq_len=512, hidden=512, vocab=32768, dtype=torch.float32),
    "cuda": dict(batch=16, seq_len=1024, hidden=4096, vocab=128256, dtype=torch.bfloat16),
}
BETA, CLIP_LOW, CLIP_HIGH = 0.04, 0.2, 0.28


TINY = dict(batch=2, seq_len=8, hidden=16, vocab=64, dtype=torch.float32)  # warms imports and lazy inits


def make_inputs(device: str, seed: int = 0, shape: dict | None = None) -> dict:
    s = shape or SHAPES["cuda" if device == "cuda" else "cpu"]
    b, t, h, v = s["batch"], s["seq_len"], s["hidden"], s["vocab"]
    gen = torch.Generator(device=device).manual_seed(seed)
    n = b * t
    mask = torch.rand(b, t, generator=gen, device=device) > 0.1
    mask[:, 0] = True
    return dict(
        hidden=(torch.randn(n, h, generator=gen, device=device) * 0.5).to(s["dtype"]).requires_grad_(),
        weight=(torch.randn(v, h, generator=gen, device=device) * h ** -0.5).to(s["dtype"]).requires_grad_(),
        labels=torch.randint(0, v, (n,), generator=gen, device=device),
        mask=mask.reshape(-1),
        adv_seq=torch.randn(b, generator=gen, device=device),
        # Plausible log-probs near the ones a random head gives (~ -log V), with spread to hit the clips.
        old=-torch.log(torch.tensor(float(v))) + 0.2 * torch.randn(n, generator=gen, device=device),
        ref=-torch.log(torch.tensor(float(v))) + 0.2 * torch.randn(n, generator=gen, device=device),
        batch=b, seq_len=t,
    )


def run_lingshu(x: dict) -> torch.Tensor:
    from lingshu_fast.kernels.fused_linear_grpo_loss import fused_linear_grpo_loss

    b, t = x["batch"], x["seq_len"]
    loss, _ = fused_linear_grpo_loss(
        x["hidden"], x["weight"], x["labels"], x["adv_seq"].repeat_interleave(t), x["mask"],
        torch.arange(b, device=x["mask"].device).repeat_interleave(t), old_logprobs=x["old"],
        ref_logprobs=x["ref"], beta=BETA, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, loss_agg="token-mean")
    loss.backward()
    return loss.detach()


_LIGER = {}


def run_liger(x: dict) -> torch.Tensor:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    on_cuda = x["hidden"].is_cuda
    if on_cuda not in _LIGER:
        _LIGER[on_cuda] = LigerFusedLinearGRPOLoss(beta=BETA, compiled=on_cuda, use_ref_model=True,
                                                   epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH, loss_type="bnpo")
    b, t = x["batch"], x["seq_len"]
    loss, _ = _LIGER[on_cuda](
        x["hidden"].view(b, t, -1), x["weight"], x["labels"].view(b, t), x["mask"].view(b, t).long(),
        x["adv_seq"], ref_per_token_logps=x["ref"].view(b, t), old_per_token_logps=x["old"].view(b, t))
    loss.backward()
    return loss.detach()


def run_torch(x: dict) -> torch.Tensor:
    """What a trainer writes without a fused kernel: full fp32 logits, log_softmax, gather."""
    t = x["seq_len"]
    logits = (x["hidden"] @ x["weight"].T).float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, x["labels"][:, None])[:, 0]
    adv = x["adv_seq"].repeat_interleave(t)
    ratio = torch.exp(logp - x["old"])
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
    d = x["ref"] - logp
    per_token = pg + BETA * (torch.exp(d) - d - 1)
    mask = x["mask"].float()
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach()


IMPLS = {"lingshu": run_lingshu, "liger": run_liger, "torch": run_torch}


def _zero_grads(x: dict) -> None:
    x["hidden"].grad = None
    x["weight"].grad = None


def _rss_mib(key: str) -> float:
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def _measure_in_this_process(impl: str) -> dict:
    """One step on fresh inputs; peak-memory growth over the inputs (CUDA allocator or peak RSS)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    IMPLS[impl](make_inputs(device, shape=TINY))  # imports and one-off allocations stay out of the peak
    x = make_inputs(device)
    if device == "cuda":
        IMPLS[impl](x)  # warm-up (Triton/compile); then measure a clean step
        _zero_grads(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        IMPLS[impl](x)
        torch.cuda.synchronize()
        return {"peak_growth_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _rss_mib("VmRSS")
    IMPLS[impl](x)
    return {"peak_growth_mib": _rss_mib("VmHWM") - base}


def measure_peak_mib(impl: str) -> float:
    if torch.cuda.is_available():
        return _measure_in_this_process(impl)["peak_growth_mib"]
    out = subprocess.run([sys.executable, __file__, impl], capture_output=True, text=True, check=True,
                         env={**os.environ, "LINGSHU_KERNELS": "auto"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]


@pytest.fixture(scope="module")
def inputs_and_reference_loss():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = make_inputs(device)
    return x, run_lingshu(x)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bench_grpo_loss(benchmark, bench_info, impl, inputs_and_reference_loss):
    if impl == "liger":
        pytest.importorskip("liger_kernel", reason="Liger-Kernel is the peer; install liger-kernel==0.8.5")
    x, our_loss = inputs_and_reference_loss
    _zero_grads(x)
    loss = IMPLS[impl](x)
    tol = 2e-2 if x["hidden"].dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(loss.float(), our_loss.float(), atol=tol, rtol=tol)
    sync = torch.cuda.synchronize if x["hidden"].is_cuda else (lambda: None)

    def step():
        _zero_grads(x)
        IMPLS[impl](x)
        sync()

    shape = SHAPES["cuda" if x["hidden"].is_cuda else "cpu"]
    benchmark.group = "grpo_loss[B={batch},T={seq_len},H={hidden},V={vocab},{dtype}]".format(**shape)
    bench_info.update(provider=impl, shape=benchmark.group, peak_growth_mib=round(measure_peak_mib(impl), 1))
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


if __name__ == "__main__":  # the fresh-process memory probe used by measure_peak_mib on CPU
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(json.dumps(_measure_in_this_process(sys.argv[1])))
