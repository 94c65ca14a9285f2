"""Shared test set-up. TRITON_INTERPRET must be set before triton is first imported, so that the
Triton kernels can run on CPU tensors when a test selects LINGSHU_KERNELS=triton."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
