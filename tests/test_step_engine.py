"""The step engine (lingshu_fast.train.engine): one batched reduction and one host sync per step,
the global-count normalisation, clipping, non-finite and empty steps, the runner contract.

A small linear model stands in for the trainer's: the engine and runner never look inside it.
"""
import math

import pytest
import torch
import torch.distributed as dist

from lingshu_fast.parallel.spawn import spawn


class _Batch:
    def __init__(self, x, y):
        self.x, self.y, self.num_tokens = x, y, x.shape[0]


def _engine(dims, grad_clip=1.0, seed=0):
    from megatron.core import parallel_state as ps

    from lingshu_fast.config import OptimConfig
    from lingshu_fast.train.engine import StepEngine
    from lingshu_fast.train.metrics import SkipTracker
    from lingshu_fast.train.optim import build_optimizer, build_scheduler
    from lingshu_fast.train.runner import LocalRunner

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model.tp, model.sequence_parallel = 1, False
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", grad_clip=grad_clip)
    opt = build_optimizer({"llm": list(model.parameters())}, cfg,
                          dp_group=ps.get_data_parallel_group() if dims.dp > 1 else None, model=model)
    return StepEngine(model, opt, build_scheduler(opt, cfg, 10), LocalRunner(model, None), dims,
                      grad_clip=grad_clip, skips=SkipTracker(3))


def _closures(batches):
    def first_forward(model, k):
        return model(batches[k].x)

    def loss_of(out, k):
        err = (out - batches[k].y).square()
        return err.sum(), {"big": (err > 1.0).sum()}

    return batches, first_forward, loss_of


def _data(rank_share, dp, seed=1):
    gen = torch.Generator().manual_seed(seed)
    xs, ys = torch.randn(8, 5, generator=gen), torch.randn(8, 3, generator=gen)
    rows = list(range(8))[rank_share::dp]
    return [_Batch(xs[rows[:len(rows) // 2]], ys[rows[:len(rows) // 2]]),
            _Batch(xs[rows[len(rows) // 2:]], ys[rows[len(rows) // 2:]])]


def _two_steps(dims):
    engine = _engine(dims)
    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append((tensor.dtype, kwargs.get("async_op", False)))
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        results = []
        for step in (1, 2):
            batches = _data(dims.dp_rank, dims.dp, seed=step)
            count = sum(b.num_tokens * 3 for b in batches)
            results.append(engine.step(*_closures(batches), count=count, host={"tokens": sum(b.num_tokens for b in batches)},
                                       stat_keys=("big",), step=step))
    finally:
        dist.all_reduce = real
    weights = torch.cat([p.detach().flatten() for p in engine.model.parameters()])
    sync_calls = [c for c in calls if c == (torch.float64, False)]
    return dict(results=[(r.loss, r.grad_norm, r.count, r.stats["big"], r.host["tokens"]) for r in results],
                weights=weights, host_syncs=engine.host_syncs, scalar_reductions=len(sync_calls))


def test_data_parallel_step_is_the_global_mean_with_one_reduction(world_of_one):
    """Pins: over DP=2 each step's loss, gradient norm, count and statistics are the global ones
    (the mean squared error over all 8 rows, as one process computes it: 1e-6), the weights after
    two clipped AdamW steps agree (1e-6), and each step made ONE blocking float64 all-reduce for its
    scalars and one host sync (the gradient buckets reduce asynchronously)."""
    from lingshu_fast.parallel.state import current_dims

    want = _two_steps(current_dims())
    for got in spawn(_two_steps, 2):
        for a, b in zip(want["results"], got["results"]):
            assert b == pytest.approx(a, rel=1e-6)
        assert float((got["weights"] - want["weights"]).abs().max()) < 1e-6
        assert got["host_syncs"] == 2 and got["scalar_reductions"] == 2
    loss, _, count, _, tokens = want["results"][0]
    assert count == 24 and tokens == 8 and loss > 0  # host figures are summed over DP ranks


def test_nonfinite_and_empty_steps(world_of_one):
    """Pins: a step whose loss is not finite changes no weight and is counted (the third in a row
    raises TrainingDiverged, the loop's one-line error); a step with a global count of 0 (an RL update
    whose groups were all filtered) makes no update; a micro-batch with no tokens is skipped and the
    micro-batch whose loss reaches nothing trainable does not call backward."""
    from lingshu_fast.parallel.state import current_dims
    from lingshu_fast.train.metrics import TrainingDiverged

    engine = _engine(current_dims())
    before = torch.cat([p.detach().flatten().clone() for p in engine.model.parameters()])
    bad = [_Batch(torch.full((2, 5), float("nan")), torch.zeros(2, 3))]
    for step in (1, 2):
        result = engine.step(*_closures(bad), count=6, stat_keys=("big",), step=step)
        assert not result.updated and math.isnan(result.loss)
    with pytest.raises(TrainingDiverged, match="3 consecutive steps skipped"):
        engine.step(*_closures(bad), count=6, stat_keys=("big",), step=3)
    after = torch.cat([p.detach().flatten() for p in engine.model.parameters()])
    assert torch.equal(before, after)
    empty = [_Batch(torch.zeros(0, 5), torch.zeros(0, 3))]
    result = engine.step(*_closures(empty), count=0, stat_keys=("big",), step=4)
    assert not result.updated and result.count == 0

    frozen = torch.nn.Linear(5, 3).requires_grad_(False)
    batches = [_Batch(torch.randn(3, 5), torch.randn(3, 3))]
    calls = []

    def loss_of(out, k):
        loss = out.square().sum()
        calls.append(loss.requires_grad)
        return loss, {}

    engine.runner.run(batches, lambda m, k: frozen(batches[k].x), loss_of)  # no "does not require grad"
    assert calls == [False]
