"""parallel.state builds Megatron-Core TP/PP/DP groups from torchrun's environment (gloo, CPU)."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from lingshu_fast.parallel.spawn import spawn


def _dims_and_allreduce(dims):
    from megatron.core import parallel_state as ps

    t = torch.tensor([float(dims.rank)])
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    return dims, t.item()


def test_tp2_dp2_groups():
    out = spawn(_dims_and_allreduce, 4, tp=2)
    dims = [d for d, _ in out]
    assert all(d.tp == 2 and d.pp == 1 and d.dp == 2 for d in dims)
    assert [d.tp_rank for d in dims] == [0, 1, 0, 1]
    assert [d.dp_rank for d in dims] == [0, 0, 1, 1]
    # ranks 0,1 form one TP group and 2,3 the other
    assert [s for _, s in out] == [1.0, 1.0, 5.0, 5.0]


def _environment_seen(dims):
    import sys

    return os.environ.get("LINGSHU_SPAWN_PROBE"), os.environ.get("LINGSHU_KERNELS"), "torch" in sys.modules


def test_ranks_see_the_environment_of_the_spawn_call(monkeypatch):
    """Pins: the ranks start from a forkserver started once, but each gets the caller's environment as it
    is when `spawn` is called (a test's monkeypatched LINGSHU_KERNELS must reach its ranks), including
    a variable removed since an earlier spawn."""
    monkeypatch.setenv("LINGSHU_SPAWN_PROBE", "first")
    monkeypatch.setenv("LINGSHU_KERNELS", "torch")
    assert spawn(_environment_seen, 2) == [("first", "torch", True)] * 2
    monkeypatch.setenv("LINGSHU_SPAWN_PROBE", "second")
    monkeypatch.delenv("LINGSHU_KERNELS")
    assert spawn(_environment_seen, 2) == [("second", None, True)] * 2


def _leave_a_child_running(dims):
    import multiprocessing

    multiprocessing.get_context("fork").Process(target=time.sleep, args=(20,)).start()  # outlives the 3 s grace, not the suite
    return "done"


def test_a_rank_that_cannot_exit_is_an_error(monkeypatch):
    """Pins: a rank that returns but leaves a child process running (it would join it at exit and hang)
    fails the call with a message that says so, instead of being killed in silence after the grace."""
    from lingshu_fast.parallel import spawn as spawn_mod

    monkeypatch.setattr(spawn_mod, "_EXIT_GRACE_S", 3.0)
    with pytest.raises(RuntimeError, match=r"ranks \[0\] returned but did not exit within 3 s"):
        spawn(_leave_a_child_running, 1)


def _boom(dims):
    raise ValueError("boom on purpose")


def test_rank_error_is_reported():
    import pytest

    with pytest.raises(RuntimeError, match="boom on purpose"):
        spawn(_boom, 2)


def test_gloo_pipeline_on_a_cuda_machine_is_a_config_error(monkeypatch):
    """Pins: pp > 1 over gloo with the model on the GPU would fail deep in the first send (gloo's
    point-to-point takes CPU tensors only); it is refused up front, before any group is created, as
    the one-line ConfigError the CLI prints (the training entry turns parallel's LayoutError into it)."""
    import torch

    from lingshu_fast.config import ConfigError, load_config
    from lingshu_fast.train.layout import start_parallel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="parallel.backend=nccl"):
        start_parallel(load_config("tiny-sft", ["parallel.pp=2", "parallel.backend=gloo"]))
