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

from lingshu_fast.config import Config
from lingshu_fast.data.formats import DataError
from lingshu_fast.parallel.state import ParallelDims
from lingshu_fast.train.build import build_state, microbatches_per_rank
from lingshu_fast.train.session import Evaluator, StageRun
from lingshu_fast.train.step import LossOptions, sft_closures


def train(cfg: Config, dims: Optional[ParallelDims] = None, evaluate: Optional[Evaluator] = None) -> dict:
    """Run (or resume) one stage; returns a summary for the demo's table."""
    with StageRun(cfg, dims, build_state, evaluate) as run:
        state, per_rank = run.state, microbatches_per_rank(cfg, run.dims)
        opts = LossOptions(z_loss_weight=cfg.train.loss_z_weight, label_smoothing=cfg.train.label_smoothing,
                           filter_eps=cfg.train.loss_filter_eps)
        for step in range(run.start + 1, cfg.train.max_steps + 1):
            timer = run.timer()  # the step's time includes its wait for data
            mbs = state.loader.take_step(per_rank)
            if len(mbs) < per_rank:  # every rank gets the same count per epoch: all stop here together
                run.stop_early("data exhausted")
                break
            host = {"tokens": sum(mb.num_tokens for mb in mbs), "flops": sum(state.flops_of(mb) for mb in mbs),
                    "skip_events": sum(state.loader.skipped_runtime.values())}
            result = run.engine.step(*sft_closures(state.runner, mbs, opts), step=step,
                                     count=sum(mb.num_label_tokens for mb in mbs), host=host)
            if result.count == 0:  # every rank sees the same global count: all stop here together
                raise DataError(f"step {step}: the global batch of {cfg.train.global_microbatches} micro-batches has no "
                                f"label tokens (no assistant text survived truncation and masking), so there is "
                                f"nothing to learn; check the records' assistant turns and data.max_length")
            skips = state.loader.local_skip_metrics() if run.dims.dp == 1 else state.loader.skip_metrics(
                run.engine.dp_group, events_total=int(result.host["skip_events"]))
            run.log(step, result, timer.stop(), label_tokens=int(result.count),
                    data_wait_s=state.loader.last_wait_s, **skips)
            if run.checkpoint_due(step):
                run.save(step)
        return run.finish()

