"""Ahead-of-time compile specs: every Triton kernel declares how CI compiles it for sm_80 and sm_90a.

Each kernel module exposes `aot_specs() -> list[AotSpec]`, one entry per (kernel, shape class,
autotune config) it launches at the 7B model's shapes. tests/test_aot_compile.py compiles every spec
for both targets with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` and checks:
it compiles, fits shared memory (A100 163 KB, H100 227 KB per block), spills no registers
(ptxas -v), and, where `expects_wgmma`, its sm_90a SASS/PTX uses wgmma. A module listed in
KERNEL_MODULES that is missing, fails to import or declares no specs fails the check.
`scripts/aot_check.sh` runs it under the newest triton and under triton 3.6 (the GPU machines').
"""
from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class AotSpec:
    name: str  # e.g. "flce_fwd[H=3584,bf16,BLOCK_V=256]"
    fn: Callable  # the @triton.jit function
    signature: dict[str, str]  # arg name -> triton type string, e.g. {"x_ptr": "*bf16", "n": "i32"}
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    expects_wgmma: bool = False  # True for kernels whose hot loop is a tl.dot
    aligned_args: tuple[str, ...] = ()  # integer args the JIT would see as multiples of 16 at these shapes
    capabilities: tuple[int, ...] = (80, 90)  # the targets that launch this config (80: A100, 90: H100)


# Shared memory per block (bytes) and the ptxas arch name of each checked target.
TARGETS = {80: (163 * 1024, "sm_80"), 90: (227 * 1024, "sm_90a")}
KERNEL_MODULES = ("fused_linear_cross_entropy", "grpo_advantages", "fused_linear_grpo_loss", "image_pack")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")


class AotDiscoveryError(RuntimeError):
    """A kernel module that CI must check could not be imported or declares no AOT specs."""


def discover_specs(modules=KERNEL_MODULES) -> list[AotSpec]:
    """The AOT specs of every kernel module. A module that cannot be imported, has no `aot_specs` or
    returns none is an error: every Triton kernel in kernels/ must be compiled by CI."""
    specs = []
    for name in modules:
        full = f"lingshu_fast.kernels.{name}"
        try:
            module = importlib.import_module(full)
        except Exception as err:  # noqa: BLE001 - any import failure is a CI failure, named
            raise AotDiscoveryError(f"kernels/{name}.py: cannot import {full}: {type(err).__name__}: {err}") from err
        found = module.aot_specs() if hasattr(module, "aot_specs") else []
        if not found:
            raise AotDiscoveryError(f"kernels/{name}.py declares no AOT specs: add `aot_specs()` listing the "
                                    f"launches of its Triton kernels (see kernels/_aot.py)")
        specs.extend(found)
    return specs


def _ptxas_verbose(ptx: str, capability: int, arch: str, workdir: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(capability)
    ptxas_path = getattr(ptxas, "path", ptxas)  # triton 3.9 returns knobs.NvidiaTool(path, version)
    src = os.path.join(workdir, f"k{capability}.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    proc = subprocess.run([ptxas_path, "-v", f"--gpu-name={arch}", src, "-o", src + ".cubin"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-2000:]}")
    return proc.stderr + proc.stdout


def compile_spec(spec: AotSpec, capability: int, workdir: str) -> dict:
    """Compile one spec for one target and measure it; `problems` lists every failed check."""
    import triton
    from triton.backends.compiler import GPUTarget

    shared_limit, arch = TARGETS[capability]
    row: dict[str, Any] = {"spec": spec.name, "capability": capability, "expects_wgmma": spec.expects_wgmma,
                           "problems": []}
    names = list(spec.signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if spec.signature[n].startswith("*") or n in spec.aligned_args}
    try:
        src = triton.compiler.ASTSource(spec.fn, spec.signature, spec.constexprs, attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as err:  # noqa: BLE001 - reported per spec
        row["problems"].append(f"compile failed: {type(err).__name__}: {str(err)[-1500:]}")
        return row
    ptx = kernel.asm["ptx"]
    target_line = next((ln.strip() for ln in ptx.splitlines() if ln.startswith(".target")), "")
    row.update(shared_bytes=kernel.metadata.shared, ptx_target=target_line, wgmma="wgmma" in ptx)
    if kernel.metadata.shared > shared_limit:
        row["problems"].append(f"shared memory {kernel.metadata.shared} B > {shared_limit} B")
    if arch not in target_line:
        row["problems"].append(f"PTX target {target_line!r} is not {arch}")
    if capability == 90 and spec.expects_wgmma and not row["wgmma"]:
        row["problems"].append("expected wgmma in the sm_90a PTX, found none")
    try:
        log = _ptxas_verbose(ptx, capability, arch, workdir)
    except Exception as err:  # noqa: BLE001
        row["problems"].append(str(err))
        return row
    spills = [(int(a), int(b)) for a, b in _SPILL_RE.findall(log)]
    regs = [int(r) for r in _REGS_RE.findall(log)]
    row.update(registers=max(regs, default=None), spill_store_bytes=sum(a for a, _ in spills),
               spill_load_bytes=sum(b for _, b in spills))
    if not spills:
        row["problems"].append(f"could not read spills from ptxas -v: {log[-500:]}")
    elif row["spill_store_bytes"] or row["spill_load_bytes"]:
        row["problems"].append(f"register spills: {row['spill_store_bytes']} B stored, "
                               f"{row['spill_load_bytes']} B loaded")
    return row


_WORKER: dict[str, Any] = {}


def _init_worker(modules, only: str, workdir: str) -> None:
    _WORKER["specs"] = [s for s in discover_specs(modules) if only in s.name]
    _WORKER["workdir"] = tempfile.mkdtemp(dir=workdir)  # ptxas's files, one folder per worker


def _compile_task(task: tuple[int, int]) -> dict:
    index, capability = task
    return compile_spec(_WORKER["specs"][index], capability, _WORKER["workdir"])


def run_all(capabilities=(80, 90), modules=KERNEL_MODULES, only: str = "", jobs: int = 0) -> dict:
    """Compile every spec for each of its targets on `jobs` processes (0: one per usable core). Each
    compile is independent and single-threaded (triton's MLIR passes, then ptxas), so they spread."""
    import triton

    specs = [s for s in discover_specs(modules) if only in s.name]
    tasks = [(i, cc) for i, spec in enumerate(specs) for cc in capabilities if cc in spec.capabilities]
    jobs = min(jobs or len(os.sched_getaffinity(0)), len(tasks))
    with tempfile.TemporaryDirectory(prefix="lingshu_aot_") as workdir:
        if jobs <= 1:
            rows = [compile_spec(specs[i], cc, workdir) for i, cc in tasks]
        else:
            # spawned, not forked: each worker imports triton and the kernel modules itself, with this
            # process's environment (TRITON_CACHE_DIR, and PYTHONPATH when aot_check.sh pins a version)
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                     initargs=(modules, only, workdir)) as pool:
                rows = list(pool.map(_compile_task, tasks))
    return {"triton": triton.__version__, "results": rows, "ok": bool(rows) and all(not r["problems"] for r in rows)}


def main(argv=None) -> int:
    """`python -m lingshu_fast.kernels._aot [NAME_PART]`: compile every spec (or those whose name holds
    NAME_PART), print a JSON report, exit 1 on failure.

    Runs the real compiler, so TRITON_INTERPRET must be unset and the cache must be fresh (a temp
    dir), which is why tests launch this in a subprocess."""
    args = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the AOT check needs the real compiler", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lingshu_aot_cache_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            report = run_all(only=args[0] if args else "")
        except AotDiscoveryError as err:
            print(f"AOT check: {err}", file=sys.stderr)
            return 1
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
