"""Per-step metrics: metrics.jsonl, progress bar, optional TensorBoard, MFU, step timing, skips.

- `metrics.jsonl` gets one JSON object per step from rank 0, fsync'd every `fsync_every` lines
  so a SIGKILL loses at most those lines. On resume the rows after the resumed step are dropped
  first, so after kill + resume each step appears once (the resumed run re-logs them).
- Non-finite numbers are written as null (strict JSON; `NaN` is not JSON and breaks jq/JS readers).
- MFU = model FLOPs per step / (step time x GPUs x the card's dense bf16 peak). The peak table holds
  NVIDIA's datasheet dense (non-sparse) bf16 tensor-core figures. On CPU there is no honest peak
  (it depends on the ISA, clocks and cores in use), so `peak_flops_per_s` is None and MFU null.
- Memory is reported in GiB (2**30 bytes): CUDA's max_memory_allocated, or on CPU the process's
  peak resident set size.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

# Dense bf16 tensor-core TFLOP/s from NVIDIA datasheets, matched as substrings of
# torch.cuda.get_device_name() in this order (specific names before generic ones).
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),  # SXM4 and PCIe share the dense bf16 peak
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
]


def peak_tflops_for_name(device_name: str) -> Optional[float]:
    upper = device_name.upper()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.upper() in upper:
            return tflops
    return None


def peak_flops_per_s(device: torch.device | str | None = None) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s, or None (CPU, or a GPU missing from the table).

    `device=None` means the current CUDA device when there is one.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    tflops = peak_tflops_for_name(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops is not None else None


def mfu(flops_per_step: float, step_time_s: float, num_gpus: int, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown or the time is 0."""
    if peak is None or peak <= 0 or step_time_s <= 0 or num_gpus <= 0:
        return None
    return flops_per_step / (step_time_s * num_gpus * peak)


def mem_gb(device: torch.device | str | None = None) -> float:
    """Peak memory in GiB: CUDA max_memory_allocated, or the process's peak RSS on CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


class StepTimer:
    """Wall time of a step; on CUDA it synchronises first so queued kernels are counted.

        with StepTimer(device) as t: ...
        t.elapsed_s
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.elapsed_s = 0.0
        self._start = None

    def _sync(self) -> None:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)

    def start(self) -> "StepTimer":
        self._sync()
        self._start = time.perf_counter()
        return self

    def stop(self) -> float:
        if self._start is None:
            raise RuntimeError("StepTimer.stop() called before start()")
        self._sync()
        self.elapsed_s = time.perf_counter() - self._start
        self._start = None
        return self.elapsed_s

    def __enter__(self) -> "StepTimer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class SkipTracker:
    """Counts skipped (non-finite) steps; raises TrainingDiverged after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError("train.max_consecutive_skips must be >= 1")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def ok(self) -> None:
        self.consecutive = 0

    def skip(self, step: int, reason: str) -> None:
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"training diverged: {self.consecutive} consecutive steps skipped (the last at step "
                f"{step}: {reason}); lower optim.lr, raise optim.warmup_steps or check the data, then "
                f"resume from the last checkpoint"
            )

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])


class CollapseWatch:
    """Notices a run that trains nothing while looking healthy: a step with trainable parameters
    and a non-zero loss whose gradient norm is exactly 0 (dead activations, an underflowed or
    poisoned weight), or - cross-entropy stages, `vocab_size` given - a loss within `rel_tol` of
    ln(V), the uniform prediction, for `patience` steps in a row (e.g. optim.lr=1e6 blew the logits
    to a constant). Warns once per process on rank 0 (stderr), and counts those steps (`collapsed_steps` in
    the metrics rows; kept in checkpoints). Collective-free: it reads the step's reduced figures."""

    def __init__(self, vocab_size: Optional[int], *, patience: int = 5, rel_tol: float = 1e-3, rank: int = 0):
        self.uniform_loss = math.log(vocab_size) if vocab_size else None
        self.patience, self.rel_tol, self.rank = int(patience), float(rel_tol), rank
        self.flat = 0  # consecutive steps at ln(V)
        self.total = 0  # collapsed steps so far
        self.warned = False

    def observe(self, step: int, *, loss: float, grad_norm: float, count: float, trainable: bool) -> bool:
        """Record one step's figures; True when this step counts as collapsed."""
        if count <= 0 or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return False  # nothing learnt from (RL groups filtered) or skipped as non-finite: not ours
        dead = trainable and grad_norm == 0.0 and loss != 0.0
        near = self.uniform_loss is not None and abs(loss - self.uniform_loss) <= self.rel_tol * self.uniform_loss
        self.flat = self.flat + 1 if near else 0
        collapsed = dead or self.flat >= self.patience
        if collapsed:
            self.total += 1
            if not self.warned and self.rank == 0:
                self.warned = True
                why = (f"grad_norm is exactly 0 with trainable parameters (loss {loss:.4f})" if dead else
                       f"the loss has sat at ln(V) = {self.uniform_loss:.4f} (uniform over the vocabulary) for "
                       f"{self.flat} steps")
                print(f"lingshu-fast: warning: step {step}: the run looks collapsed: {why}; it is learning nothing. "
                      f"Lower optim.lr, raise optim.warmup_steps or check the data and the frozen modules "
                      f"(collapsed_steps in metrics.jsonl counts such steps)", file=sys.stderr, flush=True)
        return collapsed

    def state_dict(self) -> dict[str, int]:
        return {"flat": self.flat, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.flat, self.total = int(state.get("flat", 0)), int(state.get("total", 0))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _json_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_metrics(path: Path, after_step: int, stage: Optional[int] = None) -> int:
    """Drop rows with step > after_step (of `stage` only, when given) and unreadable lines.

    When the dropped rows are the file's tail (a resume: always, unless rows were edited by hand)
    the file is cut in place, which needs no free space - a restart on a full disk must get as far
    as its first checkpoint's space check. Otherwise it is rewritten atomically. Returns how many
    rows were dropped.
    """
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        raw_lines = f.read().splitlines(keepends=True)
    kept, first_drop_at, kept_after_drop, offset = [], None, False, 0
    for raw in raw_lines:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        try:
            row = json.loads(line)
            drop = row.get("step", 0) > after_step and (stage is None or row.get("stage") == stage)
        except (ValueError, AttributeError):  # a line cut by a crash
            drop = True
        if drop and first_drop_at is None:
            first_drop_at = offset
        elif not drop:
            kept.append(line)
            kept_after_drop = kept_after_drop or first_drop_at is not None
        offset += len(raw)
    dropped = len(raw_lines) - len(kept)
    if dropped and not kept_after_drop:
        os.truncate(path, first_drop_at)
        return dropped
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """Rank 0 logs each step to metrics.jsonl, a tqdm bar and (optionally) TensorBoard. Without the
    bar (run.progress=false: batch jobs, log files) it prints one plain line every `log_every` steps
    (run.log_every) with the bar's figures, the elapsed time and an ETA.

    Other ranks get a writer whose `log` does nothing, so the loop need not branch on rank.
    `start_step`: the step the run resumes from (0 for a fresh run); rows after it are dropped.
    """

    def __init__(self, run_dir: str | os.PathLike, rank: int, *, stage: int, start_step: int = 0,
                 total_steps: Optional[int] = None, progress: bool = True, tensorboard: bool = False,
                 fsync_every: int = 1, log_every: int = 1):
        self.rank, self.stage, self.fsync_every = rank, stage, max(1, fsync_every)
        self.log_every, self.total_steps, self.start_step = max(1, log_every), total_steps, start_step
        self._started = time.perf_counter()
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self._bar = self._tb = None
        self._unsynced = 0
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_step, stage)
        self._file = open(self.path, "a")
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=f"stage {stage}", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:
                warnings.warn("run.tensorboard is on but the tensorboard package is not installed "
                              "(pip install tensorboard); logging to metrics.jsonl only", stacklevel=2)

    def log(self, *, step: int, loss: Optional[float], lr: float, grad_norm: Optional[float], tokens: int,
            tokens_per_s_per_gpu: float, mfu: Optional[float], mem_gb: float, skipped_samples: int = 0,
            **extra: Any) -> Optional[dict]:
        """Write one step's row (rank 0); returns the row as written."""
        if self.rank != 0:
            return None
        row = {"stage": self.stage, "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "tokens": tokens, "tokens_per_s_per_gpu": tokens_per_s_per_gpu, "mfu": mfu,
               "mem_gb": mem_gb, "skipped_samples": skipped_samples, **extra}
        row = {k: _json_number(v) for k, v in row.items()}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._unsynced += 1
        if self._unsynced >= self.fsync_every:
            self.flush()
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(row), refresh=False)
            self._bar.update(step - self._bar.n)
        elif step % self.log_every == 0 or step == self.total_steps:
            print(self._line(step, row), flush=True)
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("stage", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"stage{self.stage}/{k}", v, step)
        return row

    def log_extra(self, *, step: int, **values: Any) -> None:
        """An extra row for an already logged step (e.g. a final evaluation after the data ran out)."""
        if self.rank != 0:
            return
        row = {k: _json_number(v) for k, v in {"stage": self.stage, "step": step, **values}.items()}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self.flush()

    def _line(self, step: int, row: dict) -> str:
        elapsed = time.perf_counter() - self._started
        done = step - self.start_step
        total = "" if self.total_steps is None else f"/{self.total_steps}"
        eta = ""
        if self.total_steps is not None and done > 0:
            eta = f", eta {_duration(elapsed / done * max(self.total_steps - step, 0))}"
        return f"stage {self.stage} step {step}{total} | {self._postfix(row)} | {_duration(elapsed)} elapsed{eta}"

    @staticmethod
    def _postfix(row: dict) -> str:
        def fmt(v, spec):
            return "-" if v is None else format(v, spec)

        parts = [f"loss {fmt(row['loss'], '.4f')}", f"lr {fmt(row['lr'], '.2e')}",
                 f"gnorm {fmt(row['grad_norm'], '.3f')}",
                 f"tok/s/gpu {fmt(row['tokens_per_s_per_gpu'], ',.0f')}",
                 f"mfu {'-' if row['mfu'] is None else format(100 * row['mfu'], '.1f') + '%'}",
                 f"mem {fmt(row['mem_gb'], '.2f')}GiB"]
        if row.get("skipped_samples"):
            parts.append(f"skipped {row['skipped_samples']}")
        if row.get("reward_mean") is not None:
            parts.append(f"reward {row['reward_mean']:.3f}")
        return " ".join(parts)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._unsynced = 0
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
