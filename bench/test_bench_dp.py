"""Data parallelism: bucket reductions overlapped with backward vs reduced after it, and bytes per parameter.

Two gloo processes on CPU (NCCL on CUDA when a GPU and two ranks are there) each run the trainer's
`StepEngine` on the same model twice, once with the grad buffers launching each bucket's
reduction as soon as it is complete during the last micro-batch's backward (`overlap=True`, the
trainer's default) and once with every reduction launched after the backward (`overlap=False`).
The two are timed interleaved, step by step, in the same processes, so machine load hits both
alike; `overlap_speedup` = best time after backward / best time overlapped. Small buckets (4M
elements) give the overlap several buckets to pipeline at this size.

Model: a stack of `layers` linear layers of width `width` standing in for the decoder's matmuls
(what matters here is gradient bytes per FLOP, not the architecture). `bytes_per_param`:
`memory_report` of the trainable parameters, main gradients and this rank's optimizer shard over
trainable parameters, with the distributed optimizer (target 2 + 4 + 12/DP for bf16; fp32 here on
CPU: 4 + 4 + 8/DP, the fp32 parameters being their own masters).

Run: `pytest bench/test_bench_dp.py --benchmark -q -s`.
"""
from __future__ import annotations

import time

import torch

from lingshu_fast.parallel.spawn import spawn

SHAPE = dict(width=1024, layers=12, tokens=512, microbatches=4, rounds=4) if not torch.cuda.is_available() else \
    dict(width=4096, layers=16, tokens=4096, microbatches=4, rounds=6)


def _steps(dims, width, layers, tokens, microbatches, rounds):
    from megatron.core import parallel_state as ps

    from lingshu_fast.config import OptimConfig
    from lingshu_fast.train.engine import StepEngine
    from lingshu_fast.train.memory import memory_report
    from lingshu_fast.train.metrics import SkipTracker
    from lingshu_fast.train.optim import build_optimizer, build_scheduler
    from lingshu_fast.train.runner import LocalRunner

    device = torch.device("cuda", dims.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device, dtype)
    model.tp, model.sequence_parallel = 1, False
    cfg = OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant", distributed=True)
    opt = build_optimizer({"llm": list(model.parameters())}, cfg, dp_group=ps.get_data_parallel_group(),
                          model=model, bucket_numel=4_000_000)
    engine = StepEngine(model, opt, build_scheduler(opt, cfg, 1), LocalRunner(model, None), dims, grad_clip=1.0,
                        skips=SkipTracker(10 ** 9))
    xs = [torch.randn(tokens, width, device=device, dtype=dtype) for _ in range(microbatches)]

    class Batch:
        num_tokens = tokens

    def first_forward(m, k):
        return m(xs[k])

    def loss_of(hidden, k):
        return hidden.float().square().mean(), {}

    times = {True: [], False: []}
    for r in range(rounds + 1):
        for overlap in (True, False):
            opt.buffers.overlap = overlap  # False: every bucket reduces after the backward
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.step([Batch()] * microbatches, first_forward, loss_of, count=1.0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:  # the first round warms up
                times[overlap].append(time.perf_counter() - t0)
    report = memory_report(model, opt, device)  # after the steps: Adam's moments exist
    trainable = report["trainable_numel"]
    return dict(overlapped_s=min(times[True]), after_s=min(times[False]), params=trainable,
                bytes_per_param=(report["params_trainable"] + report["grads"] + report["optim"]) / trainable,
                dtype=str(dtype))


def test_bench_dp_overlap(benchmark, bench_info):
    out = {}

    def run():
        out["ranks"] = spawn(_steps, 2, SHAPE["width"], SHAPE["layers"], SHAPE["tokens"], SHAPE["microbatches"],
                             SHAPE["rounds"])

    benchmark.pedantic(run, rounds=1, iterations=1)
    ranks = out["ranks"]
    overlapped = max(r["overlapped_s"] for r in ranks)  # the step is as slow as its slowest rank
    after = max(r["after_s"] for r in ranks)
    bench_info.update(op="dp_overlap", dp=2, **SHAPE, params=ranks[0]["params"], dtype=ranks[0]["dtype"],
                      step_overlapped_s=round(overlapped, 4), step_after_backward_s=round(after, 4),
                      overlap_speedup=round(after / overlapped, 3),
                      bytes_per_param=round(max(r["bytes_per_param"] for r in ranks), 3))
    print(f"\nDP=2 step: overlapped {overlapped * 1e3:.1f} ms vs after backward {after * 1e3:.1f} ms "
          f"({after / overlapped:.2f}x); {bench_info['bytes_per_param']:.2f} bytes/param ({ranks[0]['dtype']})")
    assert overlapped > 0 and after > 0
