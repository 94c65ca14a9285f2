"""`memory_report`: bytes per trainable bf16 parameter with the distributed optimizer, frozen ones.

Target: 2 (bf16 parameter) + 4 (fp32 main gradient) + 12/DP (fp32 master, Adam m and v, this rank's
shard) per trainable parameter; frozen parameters cost their own bytes only. The bound allows the
padding that makes each gradient bucket split into DP equal shards (at most DP-1 elements per
bucket, in the gradient buffer and in the first ranks' shards).
"""
import pytest
import torch

from lingshu_fast.parallel.spawn import spawn


def _report(dims, model_dir, freeze):
    from lingshu_fast.config import load_config
    from lingshu_fast.train.build import build_trainable
    from lingshu_fast.train.memory import memory_report

    cfg = load_config("tiny-sft", [f"model.freeze=[{','.join(freeze)}]", "optim.distributed=true"])
    model, optimizer, _ = build_trainable(cfg, dims, model_dir, dtype=torch.bfloat16, device=torch.device("cpu"))
    # Adam's moments exist after the first update: one step on zero gradients
    optimizer.buffers.zero()
    optimizer.buffers.finish()
    optimizer.step()
    report = memory_report(model, optimizer, torch.device("cpu"))
    report["buckets"] = len(optimizer.buffers.buckets)
    report["frozen_numel"] = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return report


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lingshu_fast.model.testing import save_tiny_tied_model

    return str(save_tiny_tied_model(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_bytes_per_trainable_parameter(dp, model_dir, world_of_one):
    """Pins the distributed optimizer's memory: the optimizer state shrinks with DP while the bf16
    parameter and its fp32 main gradient stay; the vision tower frozen costs 2 bytes per parameter
    and nothing else (no gradient slot, no optimizer state)."""
    from lingshu_fast.parallel.state import current_dims

    ranks = [_report(current_dims(), model_dir, ["vision"])] if dp == 1 else spawn(_report, dp, model_dir, ["vision"])
    for r in ranks:
        n = r["trainable_numel"]
        slack = 16 * dp * r["buckets"] / n  # the padding of each bucket to a multiple of dp
        per_param = (r["params_trainable"] + r["grads"] + r["optim"]) / n
        assert per_param <= 6 + 12 / dp + slack, (dp, per_param)
        assert per_param >= 6 + 12 / dp - slack, (dp, per_param)  # no state lost either
        assert r["params"] - r["params_trainable"] == 2 * r["frozen_numel"] > 0
        assert r["grads"] <= 4 * n + 4 * dp * r["buckets"]
