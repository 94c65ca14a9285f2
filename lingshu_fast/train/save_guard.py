"""Collective guards around a save that every rank writes into one (shared) folder: free space before,
clean-up after a failure. Independent of what is saved (the checkpoint format lives in checkpoint.py).

- `agree_to_save`: every rank's byte count is gathered; rank 0 compares the sum (plus a margin for
  headers, pickle framing and manifests) with the free space of the folder and draws a nonce for
  the temp folder's name; every rank gets the same verdict, so either all write or none does.
- `write_on_all_ranks`: each rank writes its part; the ranks then agree on whether everyone
  succeeded (the barrier before publishing). A failure anywhere removes the whole temp folder - a
  half-written checkpoint must not keep the disk full - and is reported on every rank, with
  whether it was the disk filling up (torch.save reports that only as `file write failed`).
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

SPACE_MARGIN = 1.05  # what the files take beyond their tensors' bytes, as a factor ...
SPACE_SLACK_BYTES = 1 << 20  # ... and in bytes


def payload_bytes(obj: Any) -> int:
    """Bytes of the tensors (and arrays) inside a nested state: what writing it takes, roughly."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 16


def human_bytes(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.3g} MB"


def _collective(world: int) -> bool:
    return world > 1 and dist.is_available() and dist.is_initialized()


def agree_to_save(folder: Path, rank: int, world: int, local_bytes: int) -> tuple[str, int, Optional[str]]:
    """(nonce, bytes needed in all, None or `no space left on device: ...`), the same on every rank."""
    sizes = [local_bytes]
    if _collective(world):
        sizes = [0] * world
        dist.all_gather_object(sizes, local_bytes)
    need = int(sum(sizes) * SPACE_MARGIN) + SPACE_SLACK_BYTES
    plan: list = [secrets.token_hex(6), need, None]
    if rank == 0:
        free = shutil.disk_usage(folder).free
        if free < need:
            plan[2] = f"no space left on device: {folder} (needs ~{human_bytes(need)}, {human_bytes(free)} free)"
    if _collective(world):
        dist.broadcast_object_list(plan, src=0)
    return plan[0], plan[1], plan[2]


def is_disk_full(err: BaseException, folder: Path) -> bool:
    """ENOSPC anywhere in the exception chain (safetensors passes it on as text only), or a failed write
    on a disk with (almost) nothing left (torch.save says only `file write failed`)."""
    seen: Optional[BaseException] = err
    while seen is not None:
        if (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < SPACE_SLACK_BYTES
    except OSError:
        return False


def write_on_all_ranks(tmp_dir: Path, rank: int, world: int,
                       write: Callable[[], None]) -> Optional[tuple[int, str, bool]]:
    """Create `tmp_dir` and call `write()` on every rank; None when all succeeded, else (first failing
    rank, its error, whether any rank ran out of space), on every rank, with `tmp_dir` removed."""
    error = None
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        write()
    except Exception as err:  # noqa: BLE001 - every rank reports below instead of hanging
        error = (f"{type(err).__name__}: {err}", is_disk_full(err, tmp_dir.parent))
    errors = [error]
    if _collective(world):
        errors = [None] * world
        dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return None
    if rank == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if _collective(world):
        dist.barrier()  # nobody retries into the folder before it is gone
    return failed[0][0], failed[0][1][0], any(e[1] for _, e in failed)
