"""Checkpoints in a layout-independent form, written atomically (optionally in the background), with a
validated `latest` pointer and keep-N pruning.

Layout under `run_dir/checkpoints/`:
    step_000123/manifest.json          step, world, layout, per-file size + sha256, format version
    step_000123/model/, master/, exp_avg/, exp_avg_sq/   tensors by Hugging Face name (state_io.py):
                                       written by all ranks, readable under any (TP, PP, DP) layout
    step_000123/state.pt               schedule, optimizer step count and group LRs, loader position,
                                       rank 0's RNG, step: one for the whole run (written by rank 0)
    step_000123/rank_state/rank00000.pt  each rank's own RNG and loader state (exact same-layout resume)
    latest                             the name of the newest complete checkpoint

Atomicity: every rank writes into `step_000123.tmp-<nonce>/` (fsync'd files) and lists its files with
their sizes and sha256 in `files_rankNNNNN.json` (written last, atomically); rank 0 writes the manifest
once every rank's list is there, renames the folder to `step_000123/` (os.replace, atomic on POSIX)
and then replaces `latest` (temp file + fsync + os.replace). A crash before the rename leaves only a
`*.tmp-*` folder, which the next save deletes; a crash after it leaves a complete checkpoint (not yet
named by `latest`, so the previous one stays current). `find_latest` trusts a folder only when its
manifest lists files of the right sizes, and falls back to the previous valid one otherwise.

Resume (`train.resume.load_latest`): the candidates in that order are loaded until one loads on every
rank - the ranks share the sha256 verification of the files (each file once) and agree - so a
same-size corruption of the newest checkpoint falls back to the previous one instead of blocking
every restart. Step folders that all fail stop the run with one error naming each and why
(`checkpoint.allow_fresh_start=true` starts from step 0 instead).

Disk space (`train.save_guard`): before writing, rank 0 compares the free space with the size of
what all ranks are about to write and stops with `DiskFullError` (nothing written) when it does not
fit; a write that fails anyway (another process filled the disk) removes the temp folder and says
`no space left on device`.

Asynchronous saves (`checkpoint.async`): the step loop stalls only while the tensors are gathered
into host memory (the collectives); a background thread per rank writes and hashes the files, and
rank 0's thread publishes once every rank's file list has appeared (it polls the folder: no
collective runs outside the main thread). The next save, the end of the stage and a crash-free exit
wait for it; a SIGKILL mid-write leaves `latest` on the previous checkpoint.

Everything in the `.pt` files is plain data (tensors, dicts, lists, numbers, strings) so it loads
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
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from lingshu_fast.train import save_guard as guard

FORMAT_VERSION = 2
STATE = "state.pt"
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


def _rank_state_file(rank: int) -> str:
    return f"rank_state/rank{rank:05d}.pt"


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


def _clean_leftovers(ckpt_root: Path) -> None:
    for p in ckpt_root.glob("*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _torch_save(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_rank_files(tmp_dir: Path, rank: int, job: "SaveJob") -> None:
    """This rank's files, then its file list (sizes and sha256) written last and atomically."""
    written = [path for path in job.write_tensors(tmp_dir)]
    for path in written:
        _fsync_file(path)
    if job.global_state is not None:
        _torch_save(tmp_dir / STATE, job.global_state)
        written.append(tmp_dir / STATE)
    _torch_save(tmp_dir / _rank_state_file(rank), job.rank_state)
    written.append(tmp_dir / _rank_state_file(rank))
    files = {str(p.relative_to(tmp_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in written}
    _write_text_atomic(tmp_dir / _files_file(rank), json.dumps(files))


def _publish(ckpt_root: Path, tmp_dir: Path, name: str, step: int, world: int, nonce: str,
             layout: dict, wait_s: float = 0.0) -> Path:
    """Rank 0: manifest (once every rank's file list is there: up to `wait_s`), rename to the final
    name, then the `latest` pointer."""
    files: dict[str, dict] = {}
    deadline = time.monotonic() + wait_s
    for r in range(world):
        info_path = tmp_dir / _files_file(r)
        while not info_path.exists() and time.monotonic() < deadline and tmp_dir.is_dir():
            time.sleep(0.05)
        if not info_path.exists():
            raise CheckpointError(f"{tmp_dir}: rank {r} did not finish writing its files; is "
                                  f"run.dir on a filesystem shared by all nodes?")
        files.update(json.loads(info_path.read_text()))
        info_path.unlink()
    manifest = {"format_version": FORMAT_VERSION, "step": step, "world": world, "layout": layout,
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


@dataclass
class SaveJob:
    """What one rank saves, already in host memory: `write_tensors(folder) -> [paths]` writes its
    share of the tensors (no collectives), `global_state` (rank 0 only) and its own `rank_state`."""
    step: int
    write_tensors: Callable[[Path], list]
    global_state: Optional[dict]
    rank_state: dict
    layout: dict = field(default_factory=dict)
    tensor_bytes: int = 0  # what write_tensors writes, for the free-space check

    def nbytes(self) -> int:
        return self.tensor_bytes + guard.payload_bytes(self.global_state) + guard.payload_bytes(self.rank_state)


class CheckpointWriter:
    """Saves checkpoints of one run; with `asynchronous=True` the files are written by a background
    thread (see the module docstring). `save` and `wait` are called on every rank."""

    def __init__(self, run_dir: str | os.PathLike, *, rank: int, world: int, keep: int = 2,
                 asynchronous: bool = False, publish_timeout_s: float = 3600.0):
        self.root = Path(run_dir) / CHECKPOINTS
        self.rank, self.world, self.keep, self.asynchronous = rank, world, keep, asynchronous
        self.publish_timeout_s = publish_timeout_s
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def save(self, job: SaveJob) -> None:
        """Collective: check the free space and agree on the folder, then write (inline, or in the
        background)."""
        self.wait()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            _clean_leftovers(self.root)  # before the new nonce exists (agree_to_save waits for rank 0)
        nonce, need_bytes, no_space = guard.agree_to_save(self.root, self.rank, self.world, job.nbytes())
        if no_space is not None:
            raise DiskFullError(f"{no_space}; free space, lower checkpoint.keep or point run.dir elsewhere")
        tmp_dir = self.root / f"{step_dir_name(job.step)}.tmp-{nonce}"
        if self.asynchronous:
            self._thread = threading.Thread(target=self._write_and_publish, args=(job, tmp_dir, nonce),
                                            name=f"lingshu-checkpoint-{job.step}", daemon=True)
            self._thread.start()
            return
        failed = guard.write_on_all_ranks(tmp_dir, self.rank, self.world,
                                          lambda: _write_rank_files(tmp_dir, self.rank, job))
        if failed is not None:
            where, detail, disk_full = failed
            if disk_full:
                raise DiskFullError(f"no space left on device: {self.root} (needs ~{guard.human_bytes(need_bytes)} "
                                    f"for checkpoint step {job.step}; the partial save was removed); free space, "
                                    f"lower checkpoint.keep or point run.dir elsewhere")
            raise CheckpointError(f"saving checkpoint step {job.step} to {self.root} failed on rank {where}: {detail}")
        error = [None]
        if self.rank == 0:
            try:
                self._publish(job, tmp_dir, nonce, wait_s=0.0)
            except Exception as err:  # noqa: BLE001 - every rank raises it below instead of hanging
                error = [f"{type(err).__name__}: {err}"]
                if self.world == 1:
                    raise
        if self.world > 1:  # also the barrier: nobody starts the next save (or a load) before `latest` moved
            dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise CheckpointError(f"saving checkpoint step {job.step} to {self.root} failed on rank 0: {error[0]}")

    def _publish(self, job: SaveJob, tmp_dir: Path, nonce: str, wait_s: float) -> None:
        final = _publish(self.root, tmp_dir, step_dir_name(job.step), job.step, self.world, nonce, job.layout,
                         wait_s=wait_s)
        _prune(self.root, self.keep, protect=final)

    def _write_and_publish(self, job: SaveJob, tmp_dir: Path, nonce: str) -> None:
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            _write_rank_files(tmp_dir, self.rank, job)
            if self.rank == 0:
                self._publish(job, tmp_dir, nonce, wait_s=self.publish_timeout_s)
        except BaseException as err:  # noqa: BLE001 - raised on the main thread by `wait`
            # a half-written checkpoint must not keep the disk full; rank 0's publish gives up on the
            # folder's disappearance (the next save's clean-up would remove it too)
            shutil.rmtree(tmp_dir, ignore_errors=True)
            if guard.is_disk_full(err, self.root):
                err = DiskFullError(f"no space left on device: {self.root} (checkpoint step {job.step}; the partial "
                                    f"save was removed)")
            self._error = err

    def wait(self) -> None:
        """Block until the background save (if any) is written and published; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(f"the background checkpoint save failed: {type(err).__name__}: {err}") from err


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


def load_checkpoint(path: str | os.PathLike, rank: int = 0, *, world: int = 1, verify: bool = True) -> dict[str, Any]:
    """The run-wide state of a checkpoint folder (from `find_latest`) and this rank's own part, on CPU.

    Returns {"step", "world", "layout", "state" (schedule, optimizer counters, loader, RNG of rank 0,
    extra), "rank_state" (this rank's RNG and loader state when the checkpoint has this rank, else
    None), "folder", "manifest"}. The tensors are read by `state_io.read_state` under any layout.
    `verify` checks the sha256 of the files read here and of this rank's share (every `world`-th) of
    the tensor files, so `world` ranks together hash each file once.
    """
    path = Path(path)
    problem = validate_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"cannot load {path}: {problem}")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {manifest.get('format_version')}, this version reads "
                              f"{FORMAT_VERSION}; resume it with the lingshu-fast version that wrote it")
    rank_name = _rank_state_file(rank)
    names = [STATE] + ([rank_name] if rank_name in manifest["files"] else [])
    tensor_files = sorted(f for f in manifest["files"] if f.endswith(".safetensors"))
    for fname in names + tensor_files[rank::max(world, 1)] if verify else []:
        if _sha256(path / fname) != manifest["files"][fname]["sha256"]:
            raise CheckpointError(f"{path / fname} is corrupt: its sha256 differs from the manifest")
    loaded = {}
    for fname in names:
        try:
            loaded[fname] = torch.load(path / fname, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the file named
            raise CheckpointError(f"cannot read {path / fname}: {err}") from err
    return {"step": manifest["step"], "world": manifest["world"], "layout": manifest.get("layout", {}),
            "state": loaded[STATE], "rank_state": loaded.get(rank_name), "folder": path, "manifest": manifest}
