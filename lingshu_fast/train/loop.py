"""The training loop of stages 1-3: packed micro-batches -> the step engine -> metrics and checkpoints.

Launch: `lingshu-fast train RECIPE [key=value ...]` in one process, or
`torchrun --nproc_per_node G -m lingshu_fast.cli train RECIPE ...` (see README). The global batch
is `train.global_microbatches` packed micro-batches per step over all data-parallel ranks, so the
loss curve does not depend on (tp, pp, dp). Resume, evaluation, checkpoints and the export are the
shared stage skeleton's (session.py); the step is the engine's (engine.py) with stages 1-3's
cross-entropy closures (step.py).
"""
from __future__ import annotations

from typing import Optional

from lingshu_fast.config import Config, ConfigError
from lingshu_fast.parallel.state import ParallelDims
from lingshu_fast.train.build import build_state
from lingshu_fast.train.session import Evaluator, StageRun
from lingshu_fast.train.step import LossOptions, sft_closures


def microbatches_per_rank(cfg: Config, dims: ParallelDims) -> int:
    g = cfg.train.global_microbatches
    if g % dims.dp:
        raise ConfigError(f"train.global_microbatches={g} is not divisible by the data-parallel size {dims.dp} "
                          f"(world {dims.world} / (tp {dims.tp} * pp {dims.pp})); pick a multiple of {dims.dp}")
    return g // dims.dp


def _next_microbatches(loader, n: int) -> Optional[list]:
    """This rank's next `n` micro-batches, or None when the data ran out. Every rank runs out at
    the same step without asking the others: each epoch's plan gives every DP rank the same number
    of micro-batches (the loader's `epochs` and its per-rank split), so no collective is needed."""
    mbs = []
    for _ in range(n):
        try:
            mbs.append(next(loader))
        except StopIteration:
            return None
    return mbs


def train(cfg: Config, dims: Optional[ParallelDims] = None, evaluate: Optional[Evaluator] = None) -> dict:
    """Run (or resume) one stage; returns a summary for the demo's table."""
    with StageRun(cfg, dims, build_state, evaluate) as run:
        state, per_rank = run.state, microbatches_per_rank(cfg, run.dims)
        opts = LossOptions(z_loss_weight=cfg.train.loss_z_weight, label_smoothing=cfg.train.label_smoothing)
        for step in range(run.start + 1, cfg.train.max_steps + 1):
            mbs = _next_microbatches(state.loader, per_rank)
            if mbs is None:
                run.stop_early("data exhausted")
                break
            timer = run.timer()
            host = {"tokens": sum(mb.num_tokens for mb in mbs), "flops": sum(state.flops_of(mb) for mb in mbs),
                    "skipped": sum(state.loader.skipped_runtime.values())}
            result = run.engine.step(*sft_closures(state.runner, mbs, opts), step=step,
                                     count=sum(mb.num_label_tokens for mb in mbs), host=host)
            skipped = int(result.host["skipped"]) + sum(state.loader.skipped_startup.values())
            run.log(step, result, timer.stop(), skipped_samples=skipped, label_tokens=int(result.count))
            if run.checkpoint_due(step):
                run.save(step)
        return run.finish()

