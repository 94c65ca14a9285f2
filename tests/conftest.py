"""Shared test set-up. TRITON_INTERPRET must be set before triton is first imported, so that the
Triton kernels can run on CPU tensors when a test selects LINGSHU_KERNELS=triton."""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# pytest's importlib mode keeps folders off sys.path; two are wanted: tests/ for the shared input
# builders (tests/*_cases.py, not collected) and bench/ for the benchmark modules tests pin
# (record.py, plot.py, gpu_run.py, roofline.py; plot imports record as a sibling)
for _folder in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "bench"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))
# and the repo root LAST: processes spawned by multi-process tests unpickle their function by its module
# name (`tests.test_x` under importlib mode), which needs the root; last, so that an installed package
# always wins over a repo folder of the same name (our kernels/ vs Hugging Face's `kernels`, which
# transformers imports: the scripts keep the root off the front of sys.path with PYTHONSAFEPATH=1)
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1]))


import pytest  # noqa: E402


@pytest.fixture
def world_of_one():
    """A world-size-1 gloo group with Megatron-Core's parallel state, in this process, for tests that
    build the model in-process (its TP layers need parallel_state). Kept for the session: torch
    cannot re-create the default group cheaply, and every such test wants the same world of one."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        os.environ.pop("WORLD_SIZE", None)
        from lingshu_fast.parallel.state import init_parallel

        init_parallel(1, 1, backend="gloo")


def cuda_skip_reason() -> str | None:
    """Why the tests marked `cuda` cannot run in this process, or None when they can.

    They need a CUDA device and compiled Triton kernels: a kernel module imported under
    TRITON_INTERPRET=1 (what this file sets by default for the CPU tests) holds interpreted kernels
    for the whole process, so `pytest -m cuda` must be started with TRITON_INTERPRET=0."""
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA device (its CPU twin runs here)"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "needs compiled Triton kernels: run `TRITON_INTERPRET=0 pytest -m cuda` (bench/gpu.sh does)"
    return None


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("cuda")]
    reason = cuda_skip_reason() if marked else None
    if reason:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def use_kernels(monkeypatch):
    """`use_kernels(mode)` sets LINGSHU_KERNELS for what follows in the test (restored afterwards):
    checks switch between the plain-PyTorch reference ("torch") and the kernels ("triton", "auto")."""
    return lambda mode: monkeypatch.setenv("LINGSHU_KERNELS", mode)


@pytest.fixture
def count_calls(monkeypatch):
    """`count_calls(owner, name)` wraps `owner.name` and returns a list that gets one entry per call:
    checks use it to prove that the path they compare (a Triton launch, a Liger op) really ran."""

    def wrap(owner, name):
        calls = []
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
        return calls

    return wrap
