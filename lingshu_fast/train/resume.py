"""Resume: the newest checkpoint under a run folder that loads on every rank, verified and loaded.

The candidates are the checkpoint the `latest` pointer names, then every other step folder, most
recently written first (`checkpoint.find_latest`'s order). Each rank checks sizes, reads its own
files and verifies their sha256 (`load_checkpoint(verify=True)`), and the ranks agree on the outcome
before moving on: a same-size corruption in one rank's file of the newest checkpoint makes every
rank fall back to the previous checkpoint together, instead of blocking each restart. Hashing only
the files a rank reads keeps the check at one read of the checkpoint in all, which the load needs
anyway.

When step folders exist but none of them loads, the run stops with one error naming each
checkpoint and why: silently starting from step 0 would overwrite a run's progress.
`checkpoint.allow_fresh_start=true` starts from step 0 instead (with a warning).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from lingshu_fast.train.checkpoint import (
    CHECKPOINTS,
    LATEST,
    CheckpointError,
    _newest_first,
    load_checkpoint,
    validate_checkpoint,
)


def _candidates(ckpt_root: Path) -> list[Path]:
    """Step folders in resume order: the one `latest` names first, then the most recently written."""
    ordered = _newest_first(ckpt_root)
    pointer = ckpt_root / LATEST
    try:
        pointed = ckpt_root / pointer.read_text().strip()
    except OSError:
        return ordered
    return [pointed] + [p for p in ordered if p != pointed] if pointed in ordered else ordered


def load_latest(run_dir: str | os.PathLike, rank: int = 0, *, world: int = 1,
                allow_fresh_start: bool = False) -> Optional[tuple[Path, dict[str, Any]]]:
    """(path, this rank's `load_checkpoint`) of the newest checkpoint under `run_dir` that loads on every
    rank, or None when there is none to resume (a fresh run). Collective over `world` ranks.

    Candidates go in `_candidates` order; each rank checks sizes, reads its own files and verifies their
    sha256, and all ranks agree on the outcome, so they fall back together. When step folders exist but
    none loads: CheckpointError (one line) naming each checkpoint and why, unless `allow_fresh_start`.
    """
    ckpt_root = Path(run_dir) / CHECKPOINTS
    failures = []
    for path in _candidates(ckpt_root):
        problem, saved = validate_checkpoint(path), None
        if problem is None:
            try:
                saved = load_checkpoint(path, rank, world=world)
            except CheckpointError as err:
                problem = str(err)
        problems = [problem]
        if world > 1 and dist.is_available() and dist.is_initialized():
            problems = [None] * world
            dist.all_gather_object(problems, problem)
        bad = next((f"rank {r}: {p}" if world > 1 else p for r, p in enumerate(problems) if p is not None), None)
        if bad is None:
            if failures:
                warnings.warn(f"resuming from {path}: newer checkpoint(s) failed to load: {'; '.join(failures)}",
                              stacklevel=2)
            return path, saved
        failures.append(f"{path.name} ({bad})")
    if failures and not allow_fresh_start:
        raise CheckpointError(f"no checkpoint in {ckpt_root} can be loaded: {'; '.join(failures)}. Restore or "
                              f"remove them, or set checkpoint.allow_fresh_start=true to start from step 0")
    if failures:
        warnings.warn(f"starting from step 0 (checkpoint.allow_fresh_start=true): {'; '.join(failures)}", stacklevel=2)
    return None
