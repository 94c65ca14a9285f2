"""Run a function on N local processes over gloo: the harness of the multi-process CPU tests.

`spawn(fn, world_size, *args, tp=1, pp=1)` starts `world_size` processes with torchrun's
environment variables, calls `init_parallel(tp, pp, backend="gloo")` in each, then
`fn(dims, *args)`, and returns the list of per-rank return values (picklable). An exception in any
rank is re-raised here with that rank's traceback.

The ranks start from a forkserver that has imported torch, Megatron-Core and transformers once (their
import is ~5 s of CPU per process, most of a small test's time on 2 cores); each rank is a fork of that
clean, single-threaded server, so it begins with those modules imported and nothing run. A rank gets
the caller's environment as it is at `spawn` time (not the server's, which is fixed when it starts):
variables read at call time, such as LINGSHU_KERNELS, behave as under the "spawn" start method;
variables the three preloaded packages read at import are those of the first `spawn` of the process.
Where the platform has no forkserver, the ranks are spawned.
"""
from __future__ import annotations

import os
import pickle
import queue as queue_mod
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from lingshu_fast.parallel.state import free_port, init_parallel, shutdown_parallel


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, tp: int, pp: int, queue,
            environ: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        dims = init_parallel(tp=tp, pp=pp, backend="gloo")
        result = fn(dims, *args)
        # Plain pickle bytes, not torch's queue reductions: those share tensors through file descriptors
        # that vanish when this process exits before the parent reads them. An unpicklable result
        # also fails here, with a traceback, rather than in the queue's feeder thread.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            shutdown_parallel()
        except Exception:  # noqa: BLE001
            pass


# A rank exits within a second or two of reporting; one that does not is waiting on something it started
# (a multiprocessing child joins its own children at exit, e.g. a data loader's builders left open).
_EXIT_GRACE_S = 30.0
_PRELOAD = ("torch", "megatron.core", "transformers")  # third-party only: none reads our variables


def _context():
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    return ctx


def spawn(fn: Callable, world_size: int, *args: Any, tp: int = 1, pp: int = 1, timeout_s: float = 300.0) -> list:
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, tp, pp, queue, environ), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, payload = queue.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs)
                        if r not in results and p.exitcode is not None and p.exitcode != 0]
                if dead:
                    time.sleep(1.0)  # let a rank that failed cleanly report its traceback first
                    if queue.empty():
                        errors.extend(f"rank {r} died with exit code {code} without reporting" for r, code in dead)
                if time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout_s:.0f} s waiting for ranks "
                                  f"{sorted(set(range(world_size)) - set(results))}")
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
    finally:
        stuck = []
        for r, p in enumerate(procs):
            p.join(timeout=5 if errors else _EXIT_GRACE_S)
            if p.is_alive():
                p.kill()
                stuck.append(r)
    if stuck and not errors:  # a rank that returned but cannot exit leaks a process or a thread (see above)
        errors.append(f"ranks {stuck} returned but did not exit within {_EXIT_GRACE_S:.0f} s (killed): a child "
                      f"process or non-daemon thread they started is still running; close it before returning")
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
