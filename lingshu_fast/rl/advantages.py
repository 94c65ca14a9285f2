"""GRPO advantages of a rollout, computed on the training device.

`rollout_advantages(rewards, seq_prompt, device=None) -> np.ndarray` sends the rollout's rewards and
group ids to `device` (default: the current CUDA device when there is one, else the CPU) and runs
`lingshu_fast.kernels.grpo_advantages` there: on a GPU that is its Triton kernel, on the CPU its
plain-PyTorch reference (the op's own dispatch decides). The planner needs the advantages on the
host to pack them into micro-batches, so they come back as a float32 array.
"""
from __future__ import annotations

import numpy as np
import torch

from lingshu_fast.kernels import grpo_advantages


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def rollout_advantages(rewards: np.ndarray, seq_prompt: np.ndarray, device=None) -> np.ndarray:
    """Per-sequence advantages [B*G] (float32) of `rewards` [B*G] grouped by `seq_prompt` [B*G]."""
    device = torch.device(device) if device is not None else default_device()
    rewards_t = torch.as_tensor(np.asarray(rewards, dtype=np.float32), device=device)
    groups_t = torch.as_tensor(np.asarray(seq_prompt, dtype=np.int64), device=device)
    return grpo_advantages(rewards_t, groups_t).cpu().numpy()
