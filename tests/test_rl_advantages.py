"""rollout_advantages: the rollout's GRPO advantages computed on the training device.

The training loop used to call grpo_advantages on CPU tensors made from numpy, so its Triton kernel
never ran in training. These tests pin that the function sends the rewards to the device it is
given and lets the op's dispatch pick the kernel there, and that the numbers are GRPO's (written
from the definition here, not taken from our op).
"""
import importlib

import numpy as np
import pytest
import torch

from lingshu_fast.rl import advantages as adv_mod

# By module path: kernels/__init__ re-exports a function of the same name as this module.
gmod = importlib.import_module("lingshu_fast.kernels.grpo_advantages")


def _oracle(rewards: np.ndarray, groups: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    out = np.zeros_like(rewards, dtype=np.float64)
    for gid in np.unique(groups):
        sel = groups == gid
        r = rewards[sel].astype(np.float64)
        out[sel] = 0.0 if r.size < 2 else (r - r.mean()) / (r.std(ddof=1) + eps)
    return out


ROLLOUT = (np.array([1.0, 0.0, 0.5, 1.0, 0.2, 0.2, 0.9, 0.3, 0.4], np.float32), np.repeat(np.arange(3), 3))


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_rollout_advantages_match_grpo_definition(monkeypatch, path):
    """Both dispatch paths give GRPO's (r - mean_g) / (std_g + eps) with the unbiased std; fp32 to 1e-5.
    A group whose rewards are all equal gets 0."""
    monkeypatch.setenv("LINGSHU_KERNELS", path)
    rewards, groups = ROLLOUT
    got = adv_mod.rollout_advantages(rewards, groups, "cpu")
    assert got.dtype == np.float32 and got.shape == rewards.shape
    np.testing.assert_allclose(got, _oracle(rewards, groups), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(adv_mod.rollout_advantages(np.ones(4, np.float32), np.zeros(4, int), "cpu"), 0.0)


def test_rollout_advantages_runs_the_kernel_on_the_device_tensors(monkeypatch):
    """The Triton kernel must see tensors on the requested device (here the CPU under the interpreter,
    on a GPU the CUDA device): it is what runs in training, not a host-side copy of the maths."""
    monkeypatch.setenv("LINGSHU_KERNELS", "triton")
    seen = []
    real = gmod._grpo_advantages_triton

    def spy(rewards, group_index, std_normalize, eps):
        seen.append((rewards.device, group_index.device, rewards.dtype))
        return real(rewards, group_index, std_normalize, eps)

    monkeypatch.setattr(gmod, "_grpo_advantages_triton", spy)
    rewards, groups = ROLLOUT
    adv_mod.rollout_advantages(rewards, groups, torch.device("cpu"))
    assert seen == [(torch.device("cpu"), torch.device("cpu"), torch.float32)]


def test_default_device_is_the_accelerator_when_there_is_one(monkeypatch):
    """Without an explicit device the rollout goes to the current CUDA device (the training device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert adv_mod.default_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert adv_mod.default_device() == torch.device("cpu")
