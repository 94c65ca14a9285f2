"""One entry for every stage: `run_stage(cfg)` trains stages 1-3 (`train.loop.train`) or stage 4
(`rl.loop.train_rl`), with the scheduled evaluation injected (the training layers never import the
evaluation layer above them). Used by the CLI and the demo."""
from __future__ import annotations

import functools
from typing import Optional

from lingshu_fast.config import Config
from lingshu_fast.eval.run import scheduled_eval
from lingshu_fast.parallel.state import ParallelDims
from lingshu_fast.rl.loop import train_rl
from lingshu_fast.train.loop import train


def run_stage(cfg: Config, dims: Optional[ParallelDims] = None) -> dict:
    """Train (or resume) the stage `cfg` names (on `dims` when the groups exist); returns its summary."""
    evaluate = functools.partial(scheduled_eval, cfg)
    return (train_rl if cfg.train.stage == 4 else train)(cfg, dims, evaluate=evaluate)
