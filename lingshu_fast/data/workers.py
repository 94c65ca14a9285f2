"""Keeping the device fed: data worker processes, and host-to-device copies one micro-batch ahead.

Workers are processes, not threads: JSON parsing, the chat template, M-RoPE ids and the Python
around PIL hold the GIL, so only processes let decode + resize scale with cores. They start from a
fork server that has imported the builder once (`forkserver`: cheap to start, and never a fork of
a trainer that already runs CUDA, NCCL or tokenizer threads); each takes the `BuildSpec` once, then
builds the micro-batches it is sent, single-threaded (torch and tokenizers each use one thread),
and returns plain numpy arrays through the pipe (no shared memory, so /dev/shm size never matters).

A worker never outlives its trainer. ProcessPoolExecutor's workers block on a queue whose write
end they hold themselves, so a trainer killed with SIGKILL (an OOM kill, a scheduler's preemption,
`kill -9`) would leave them - and the fork server they keep alive - running for ever, each holding
its memory and open files. Each worker therefore watches the trainer's pid (a pidfd where Linux has
one, else a once-a-second probe) and exits when it is gone. The converse holds too: a trainer that is
itself a multiprocessing child (a rank started by a launcher's or a test's multiprocessing) joins its
children when it exits, while they wait for it to be gone; so a pool not closed by its owner is shut
down by an exit finalizer, which multiprocessing runs before that join.

`default_num_workers()`: the CPU cores this process may use, shared by the local ranks
(LOCAL_WORLD_SIZE, set by torchrun), minus one for the trainer itself, at most 8.

`DeviceStager` on CUDA copies a micro-batch into pinned host memory and issues its non-blocking
copy on a side stream; `ready()` makes the compute stream wait for that copy (an event, not a host
sync) and records the tensors' use on it, so the caching allocator cannot recycle them early. The
loader stages the next micro-batch as soon as it is built, so its copy overlaps the current
step's compute. On CPU the stager hands batches through unchanged.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.util
import os
import select
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Optional

import torch

from lingshu_fast.data.batch import MicroBatch

MAX_DEFAULT_WORKERS = 8
_BUILDER = None  # the worker process's BatchBuilder


def default_num_workers() -> int:
    """data.num_workers: null -> the cores per local rank minus one (0: build in the trainer), <= 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(MAX_DEFAULT_WORKERS, cores // local_ranks - 1))


def _exit_with(pid: int) -> None:
    """Block until process `pid` is gone, then end this one (see the module docstring)."""
    try:
        fd = os.pidfd_open(pid)  # readable once the process has exited; immune to pid reuse
        select.select([fd], [], [])
    except (AttributeError, OSError):  # no pidfd (old kernel or not Linux), or already gone
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:  # alive, owned by someone else (a reused pid): keep watching
                pass
            time.sleep(1.0)
    os._exit(0)


def _init_worker(spec, trainer_pid: int) -> None:
    global _BUILDER
    threading.Thread(target=_exit_with, args=(trainer_pid,), daemon=True, name="trainer-watch").start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)
    from lingshu_fast.data.builder import BatchBuilder

    _BUILDER = BatchBuilder(spec)


def _build(sample_ids, record_ids):
    return _BUILDER.build(sample_ids, record_ids)


class WorkerPool:
    """`num_workers` builder processes; `submit` returns a Future of `BatchBuilder.build`."""

    def __init__(self, spec, num_workers: int):
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload(["lingshu_fast.data.builder"])
        self._pool = ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker,
                                         initargs=(spec, os.getpid()))
        # close() at the latest when this process exits (see the module docstring); runs once. Priority 20:
        # before the executor's own queues close their feeder threads (10), which would strand the stop signal
        self._close = multiprocessing.util.Finalize(self, self._pool.shutdown,
                                                    kwargs=dict(wait=True, cancel_futures=True), exitpriority=20)

    def submit(self, sample_ids, record_ids) -> Future:
        return self._pool.submit(_build, sample_ids, record_ids)

    def close(self) -> None:
        self._close()


class DeviceStager:
    """Host MicroBatch -> on `device`, copied on a side stream (see the module docstring)."""

    def __init__(self, device: Optional[torch.device]):
        self.device = torch.device(device) if device is not None else None
        cuda = self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(self.device) if cuda else None

    def stage(self, mb: MicroBatch):
        """Start moving `mb`; returns a handle for `ready`."""
        if self.stream is None:
            return mb, None, None
        pinned = mb.pin_memory()
        with torch.cuda.stream(self.stream):
            moved = pinned._map_tensors(lambda t: t.to(self.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(self.stream)
        return moved, done, pinned  # `pinned` stays referenced until the copy is waited for

    def ready(self, handle) -> MicroBatch:
        moved, done, _ = handle
        if done is None:
            return moved
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        for f in dataclasses.fields(moved):
            value = getattr(moved, f.name)
            if isinstance(value, torch.Tensor):
                value.record_stream(current)
        return moved
