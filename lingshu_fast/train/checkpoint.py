"""Per-rank checkpoints written atomically, with a validated `latest` pointer and keep-N pruning.

Layout under `run_dir/checkpoints/`:
    step_000123/manifest.json              step, world, per-file size + sha256, format version
    step_000123/model_rank00000.safetensors   this rank's model tensors (when it has any)
    step_000123/state_rank00000.pt         optimizer, scheduler, RNG, loader state, extra (torch.save)
    latest                                 the name of the newest complete checkpoint

Atomicity: every rank writes into `step_000123.tmp-<nonce>/` (fsync'd files), all ranks meet at a
barrier, rank 0 writes the manifest, renames the folder to `step_000123/` (os.replace, atomic on
POSIX) and then replaces `latest` (temp file + fsync + os.replace). A crash before the rename
leaves only a `*.tmp-*` folder, which the next save deletes; a crash after it leaves a complete
checkpoint (not yet named by `latest`, so the previous one stays current). `find_latest` trusts a
folder only when its manifest lists files of the right sizes, and falls back to the previous valid
one with a warning otherwise.

Resume (`train.resume.load_latest`): the candidates in that order are loaded until one loads on every rank -
each rank verifies the sha256 of the files it reads, and the ranks agree - so a same-size
corruption of the newest checkpoint falls back to the previous one instead of blocking every
restart. Step folders that all fail stop the run with one error naming each and why
(`checkpoint.allow_fresh_start=true` starts from step 0 instead).

Disk space (`train.save_guard`): before writing, rank 0 compares the free space with the size of
what all ranks are about to write and stops with `DiskFullError` (nothing written) when it does not
fit; a write that fails anyway (another process filled the disk) removes the temp folder and says
`no space left on device`.

Everything in `state_rank*.pt` is plain data (tensors, dicts, lists, numbers, strings) so it loads
with `torch.load(weights_only=True)`; RNG states are stored as tensors for the same reason.
Multi-node runs need `run_dir` on a shared filesystem (every rank writes into the same folder).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lingshu_fast.train import save_guard as guard

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says which file and why."""


class DiskFullError(CheckpointError):
    """A checkpoint does not fit on its disk: `no space left on device: <path> (needs ~X GB ...)`."""




def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _model_file(rank: int) -> str:
    return f"model_rank{rank:05d}.safetensors"


def _state_file(rank: int) -> str:
    return f"state_rank{rank:05d}.pt"


def _files_file(rank: int) -> str:
    return f"files_rank{rank:05d}.json"


# --------------------------------------------------------------------------- file helpers


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _model_tensors(model_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str], dict[str, Any]]:
    """Split a state dict into safetensors-able tensors, keys whose value is None (Megatron-Core's
    `_extra_state`, kept so the state dict round-trips exactly) and other values.

    safetensors refuses tensors sharing storage (tied weights): later aliases get their own copy.
    """
    tensors: dict[str, torch.Tensor] = {}
    none_keys: list[str] = []
    other: dict[str, Any] = {}
    seen_storage: set[tuple[str, int]] = set()
    for name, value in model_state.items():
        if value is None:
            none_keys.append(name)
            continue
        if not isinstance(value, torch.Tensor):
            other[name] = value
            continue
        t = value.detach()
        t = t.cpu() if t.device.type != "cpu" else t
        key = (str(value.device), value.untyped_storage().data_ptr())
        if key in seen_storage or not t.is_contiguous():
            t = t.contiguous().clone()
        seen_storage.add(key)
        tensors[name] = t
    return tensors, none_keys, other


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (when CUDA is in use) the current CUDA device's RNG state, as
    tensors (so the checkpoint loads with weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Only this process's device: touching every GPU would create a CUDA context (hundreds of
        # MB) on each of them from every rank.
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())
        else:
            warnings.warn("the checkpoint holds a CUDA RNG state but CUDA is not available here; "
                          "CPU RNGs restored only", stacklevel=2)


# --------------------------------------------------------------------------- save


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _clean_leftovers(ckpt_root: Path) -> None:
    for p in ckpt_root.glob("*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _write_rank_files(tmp_dir: Path, rank: int, model_state, state: dict) -> None:
    written: dict[str, dict] = {}
    if model_state:
        tensors, none_keys, other = _model_tensors(model_state)
        if other:
            state["model_extra"] = other
        path = tmp_dir / _model_file(rank)
        save_file(tensors, str(path), metadata={"format": "pt", "none_keys": json.dumps(none_keys)})
        _fsync_file(path)
        written[path.name] = {}
    path = tmp_dir / _state_file(rank)
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    written[path.name] = {}
    for name in written:  # each rank hashes its own files, so rank 0 does not read everything
        written[name] = {"bytes": (tmp_dir / name).stat().st_size, "sha256": _sha256(tmp_dir / name)}
    _write_text_atomic(tmp_dir / _files_file(rank), json.dumps(written))


def _publish(ckpt_root: Path, tmp_dir: Path, name: str, step: int, world: int, nonce: str) -> Path:
    """Rank 0: manifest, rename to the final name, then the `latest` pointer."""
    files: dict[str, dict] = {}
    for r in range(world):
        info_path = tmp_dir / _files_file(r)
        if not info_path.exists():
            raise CheckpointError(f"{tmp_dir}: rank {r} did not finish writing its files; is "
                                  f"run.dir on a filesystem shared by all nodes?")
        files.update(json.loads(info_path.read_text()))
        info_path.unlink()
    manifest = {"format_version": FORMAT_VERSION, "step": step, "world": world,
                "created_unix_s": time.time(), "files": files}
    _write_text_atomic(tmp_dir / MANIFEST, json.dumps(manifest, indent=1))
    final = ckpt_root / name
    if final.exists():  # saving the same step again (e.g. after resuming at it): move the old aside
        os.replace(final, ckpt_root / f"{name}.tmp-old-{nonce}")
    os.replace(tmp_dir, final)
    _fsync_dir(ckpt_root)
    _write_text_atomic(ckpt_root / LATEST, name + "\n")
    shutil.rmtree(ckpt_root / f"{name}.tmp-old-{nonce}", ignore_errors=True)
    return final


def _prune(ckpt_root: Path, keep: int, protect: Path) -> None:
    if keep <= 0:
        return
    for path in _newest_first(ckpt_root)[keep:]:
        if path != protect:
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model_state: Optional[dict] = None,
                    optim_state: Optional[dict] = None, sched_state: Optional[dict] = None,
                    rng_state: Optional[dict] = None, loader_state: Optional[dict] = None,
                    extra: Optional[dict] = None, rank: int = 0, world: Optional[int] = None,
                    keep: int = 2) -> Path:
    """Write this rank's part of checkpoint `step`; collective over all `world` ranks.

    `model_state` may be None on ranks whose weights another rank already saves (e.g. DP replicas);
    load those with `load_checkpoint(..., model_rank=...)`. `rng_state` defaults to
    `capture_rng_state()`. Keeps the `keep` newest checkpoints (0: keep all). Returns the final folder.
    """
    world = _dist_world() if world is None else world
    ckpt_root = Path(run_dir) / CHECKPOINTS
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(ckpt_root)  # before the new nonce exists, so no rank's fresh files are hit
    state = {"format_version": FORMAT_VERSION, "step": step, "rank": rank, "world": world,
             "optim": optim_state, "sched": sched_state,
             "rng": rng_state if rng_state is not None else capture_rng_state(),
             "loader": loader_state, "extra": extra or {}}
    nonce, need_bytes, no_space = guard.agree_to_save(ckpt_root, rank, world,
                                                      guard.payload_bytes(model_state) + guard.payload_bytes(state))
    if no_space is not None:
        raise DiskFullError(f"{no_space}; free space, lower checkpoint.keep or point run.dir elsewhere")
    name = step_dir_name(step)
    tmp_dir = ckpt_root / f"{name}.tmp-{nonce}"
    failed = guard.write_on_all_ranks(tmp_dir, rank, world, lambda: _write_rank_files(tmp_dir, rank, model_state, state))
    if failed is not None:
        where, detail, disk_full = failed
        if disk_full:
            raise DiskFullError(f"no space left on device: {ckpt_root} (needs ~{guard.human_bytes(need_bytes)} for "
                                f"checkpoint step {step}; the partial save was removed); free space, lower "
                                f"checkpoint.keep or point run.dir elsewhere")
        raise CheckpointError(f"saving checkpoint step {step} to {ckpt_root} failed on rank {where}: {detail}")
    final = ckpt_root / name
    error = [None]
    if rank == 0:
        try:
            final = _publish(ckpt_root, tmp_dir, name, step, world, nonce)
            _prune(ckpt_root, keep, protect=final)
        except Exception as err:  # noqa: BLE001 - every rank raises it below instead of hanging
            error = [f"{type(err).__name__}: {err}"]
            if world == 1:
                raise
    if world > 1:  # also the barrier: nobody starts the next save (or a load) before `latest` moved
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise CheckpointError(f"saving checkpoint step {step} to {ckpt_root} failed on rank 0: {error[0]}")
    return final


# --------------------------------------------------------------------------- find and load


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return out


def _newest_first(ckpt_root: Path) -> list[Path]:
    """Step folders, most recently written first (manifest time, then step; no manifest: last).

    Write time, not step number, decides: a fresh run (checkpoint.resume=false) in a folder with an
    older, longer run's checkpoints must neither resume those nor have its own pruned.
    """
    def created(step_path: tuple[int, Path]) -> tuple[float, int]:
        step, path = step_path
        try:
            return float(json.loads((path / MANIFEST).read_text())["created_unix_s"]), step
        except (OSError, ValueError, KeyError, TypeError):
            return float("-inf"), step

    return [p for _, p in sorted(_step_dirs(ckpt_root), key=created, reverse=True)]


def validate_checkpoint(path: Path, *, checksums: bool = False) -> Optional[str]:
    """None if `path` is a complete checkpoint, else the reason it is not."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return f"{manifest_path} is missing (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{manifest_path} is unreadable: {err}"
    for fname, info in files.items():
        fpath = path / fname
        if not fpath.exists():
            return f"{fpath} is missing"
        size = fpath.stat().st_size
        if size != info["bytes"]:
            return f"{fpath} has {size} bytes, the manifest says {info['bytes']}"
        if checksums and _sha256(fpath) != info["sha256"]:
            return f"{fpath} does not match its sha256 in the manifest"
    return None


def find_latest(run_dir: str | os.PathLike, *, checksums: bool = False) -> Optional[Path]:
    """The checkpoint to resume from under `run_dir/checkpoints`, or None when there is none.

    That is the one the `latest` pointer names when it is valid. If it is not (manifest or a file
    missing or truncated; with `checksums=True` also altered), or the pointer is missing, the most
    recently written valid checkpoint is returned with a warning.
    """
    ckpt_root = Path(run_dir) / CHECKPOINTS
    pointer = ckpt_root / LATEST
    if pointer.exists():
        pointed = ckpt_root / pointer.read_text().strip()
        problem = validate_checkpoint(pointed, checksums=checksums)
        if problem is None:
            return pointed
        warnings.warn(f"the latest checkpoint {pointed} is invalid ({problem}); "
                      f"falling back to the previous valid one", stacklevel=2)
    for path in _newest_first(ckpt_root):
        problem = validate_checkpoint(path, checksums=checksums)
        if problem is None:
            warnings.warn(f"resuming from {path} (the `latest` pointer did not name a valid checkpoint)",
                          stacklevel=2)
            return path
        warnings.warn(f"skipping invalid checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_checkpoint(path: str | os.PathLike, rank: int = 0, *, world: Optional[int] = None,
                    model_rank: Optional[int] = None, verify: bool = True) -> dict[str, Any]:
    """This rank's part of a checkpoint folder (from `find_latest`), on CPU.

    Returns {"step", "world", "model_state" (dict of tensors, or None), "optim_state", "sched_state",
    "rng_state", "loader_state", "extra", "manifest"}. `world` (when given) must equal the world
    the checkpoint was saved with: the files are per rank and not resharded. `model_rank` picks
    whose model file to read (default: `rank`). `verify` checks the sha256 of the files read.
    """
    path = Path(path)
    problem = validate_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"cannot load {path}: {problem}")
    manifest = json.loads((path / MANIFEST).read_text())
    if world is not None and manifest["world"] != world:
        raise CheckpointError(f"{path} was saved by {manifest['world']} ranks, this run has {world}; "
                              f"resume with the same parallel layout (resharding is not supported)")
    state_name = _state_file(rank)
    model_name = _model_file(rank if model_rank is None else model_rank)
    if state_name not in manifest["files"]:
        raise CheckpointError(f"{path} has no state for rank {rank} (saved with world {manifest['world']})")
    for fname in (state_name, model_name):
        info = manifest["files"].get(fname)
        if verify and info is not None and _sha256(path / fname) != info["sha256"]:
            raise CheckpointError(f"{path / fname} is corrupt: its sha256 differs from the manifest")
    try:
        state = torch.load(path / state_name, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"cannot read {path / state_name}: {err}") from err
    model_state = None
    if model_name in manifest["files"]:
        model_state = load_file(str(path / model_name))
        with safe_open(str(path / model_name), framework="pt") as f:
            none_keys = json.loads((f.metadata() or {}).get("none_keys", "[]"))
        model_state.update({k: None for k in none_keys})
        model_state.update(state.pop("model_extra", {}) if model_rank in (None, rank) else {})
    return {"step": state["step"], "world": state["world"], "model_state": model_state,
            "optim_state": state["optim"], "sched_state": state["sched"], "rng_state": state["rng"],
            "loader_state": state["loader"], "extra": state["extra"], "manifest": manifest}
