"""Benchmark suite set-up: `pytest bench/ --benchmark` runs it, plain `pytest bench/` skips it.

Benchmarks are slow and their figures only mean something on a quiet machine, so they never run
by accident: without `--benchmark` every test under bench/ is skipped (the run still exits 0).
With it, pytest-benchmark times them; `--benchmark-json FILE` keeps the figures, and each
benchmark's `extra_info` carries the machine that produced them (device name, torch version,
commit) through the `bench_info` fixture, which fills `benchmark.extra_info` and returns it.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# the benchmarks' helper modules (roofline.py, record.py, ...) sit beside them; pytest's importlib mode
# keeps bench/ off sys.path, so `pytest bench/ --benchmark` puts it there (gpu_run.py does the same)
sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCH_DIR = Path(__file__).resolve().parent
SKIP_REASON = "pass --benchmark to run benchmarks"


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark", action="store_true", default=False,
        help="run the benchmarks under bench/ (skipped otherwise)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if BENCH_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


def _commit() -> str:
    if os.environ.get("LINGSHU_COMMIT"):  # a checkout copied without .git (the lent GPU machines)
        return os.environ["LINGSHU_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _cpu_name() -> str:
    # platform.processor() is often just "x86_64" on Linux; /proc/cpuinfo names the model.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def collect_machine_info() -> dict:
    """Device name (the CUDA card, else the CPU), core count, torch version, commit."""
    info = {"commit": _commit(), "cpu_cores": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        cuda = torch.cuda.is_available()
        info["device"] = torch.cuda.get_device_name() if cuda else _cpu_name()
        info["device_kind"] = "cuda" if cuda else "cpu"
    except ImportError:
        info.update(torch="not installed", device=_cpu_name(), device_kind="cpu")
    return info


@pytest.fixture(scope="session")
def machine_info() -> dict:
    return collect_machine_info()


@pytest.fixture
def bench_info(benchmark, machine_info) -> dict:
    """`benchmark.extra_info`, pre-filled with the machine; tests add shape, provider, figures."""
    benchmark.extra_info.update(machine_info)
    return benchmark.extra_info


try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # without the plugin its hook name would be an "unknown hook" error
    pass
else:

    def pytest_benchmark_update_machine_info(config, machine_info):
        # pytest-benchmark's JSON "machine_info" block gets the same fields, once per run.
        machine_info.update({f"lingshu_{k}": v for k, v in collect_machine_info().items()})
