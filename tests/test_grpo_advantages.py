"""grpo_advantages: reference and Triton (interpreter) paths against oracles written from the definitions
of verl's `compute_grpo_outcome_advantage` (loop over groups, torch.std unbiased, eps 1e-6) and TRL's
GRPOTrainer (contiguous groups of G viewed as [B/G, G], std unbiased)."""
from __future__ import annotations

import math

import pytest
import torch

from lingshu_fast.kernels.grpo_advantages import grpo_advantages, grpo_advantages_reference


def loop_oracle(rewards, group_index, std_normalize=True, eps=1e-6):
    """verl's definition, one Python loop per group in fp64; lone groups get 0 (our documented choice)."""
    r = rewards.double().tolist()
    ids = group_index.tolist()
    members: dict[int, list[int]] = {}
    for i, g in enumerate(ids):
        members.setdefault(g, []).append(i)
    out = [0.0] * len(r)
    for idx in members.values():
        if len(idx) < 2:
            continue
        vals = [r[i] for i in idx]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i in idx:
            out[i] = (r[i] - mean) / (std + eps) if std_normalize else r[i] - mean
    return torch.tensor(out, dtype=torch.float64)


def _random_batch(seed: int, n: int, n_groups: int):
    gen = torch.Generator().manual_seed(seed)
    # Arbitrary ids: large, negative, non-contiguous, shuffled.
    id_pool = torch.randperm(1000, generator=gen)[:n_groups] * 13 - 4000
    group_index = id_pool[torch.randint(0, n_groups, (n,), generator=gen)]
    rewards = torch.randn(n, generator=gen) * 2 + 0.5
    return rewards, group_index


@pytest.fixture(params=["torch", "triton"])
def kernels_mode(request, monkeypatch):
    monkeypatch.setenv("LINGSHU_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize("std_normalize", [True, False])
@pytest.mark.parametrize("n,n_groups", [(1, 1), (7, 3), (64, 4), (203, 17), (300, 2)])
def test_matches_loop_oracle(kernels_mode, std_normalize, n, n_groups):
    """Pins the group statistics (unbiased std, eps outside the sqrt, lone groups 0) on unsorted,
    non-contiguous ids, groups larger than the kernel's BLOCK (300 in 2 groups) and B=1.
    fp32 accumulation of O(1) rewards: 1e-5 is ~100 ulp of the result."""
    rewards, group_index = _random_batch(n * 31 + n_groups, n, n_groups)
    got = grpo_advantages(rewards, group_index, std_normalize=std_normalize)
    assert got.dtype == rewards.dtype and got.shape == rewards.shape
    torch.testing.assert_close(got.double(), loop_oracle(rewards, group_index, std_normalize), atol=1e-5, rtol=1e-5)


def test_trl_contiguous_groups(kernels_mode):
    """TRL's vectorised form for contiguous equal-size groups (view [B/G, G], std unbiased, eps 1e-4)."""
    group_size, n_prompts = 8, 6
    rewards = torch.randint(0, 3, (n_prompts * group_size,)).float() * 0.5 + torch.rand(n_prompts * group_size)
    grouped = rewards.view(n_prompts, group_size)
    trl = (rewards - grouped.mean(1).repeat_interleave(group_size)) / (
        grouped.std(1).repeat_interleave(group_size) + 1e-4
    )
    group_index = torch.arange(n_prompts).repeat_interleave(group_size)
    torch.testing.assert_close(grpo_advantages(rewards, group_index, eps=1e-4), trl, atol=1e-5, rtol=1e-5)


def test_lone_and_constant_groups_are_zero(kernels_mode):
    """A group of one has no baseline (verl would give r/(1+eps); we give 0 on purpose), and an
    all-equal group has std 0: 0/(0+eps) must be exactly 0, never NaN."""
    rewards = torch.tensor([3.0, 1.0, 1.0, 1.0, -2.0, 5.0, 7.0])
    group_index = torch.tensor([42, 7, 7, 7, -1, 9, 9])
    got = grpo_advantages(rewards, group_index)
    assert torch.isfinite(got).all()
    assert got[:5].eq(0).all(), got
    expected_pair = 1.0 / (math.sqrt(2.0) + 1e-6)  # (5, 7): mean 6, unbiased std sqrt(2)
    torch.testing.assert_close(got[5:], torch.tensor([-expected_pair, expected_pair]))
    assert grpo_advantages(rewards, group_index, std_normalize=False)[:5].eq(0).all()


def test_two_pass_variance_no_cancellation(kernels_mode):
    """Rewards near 1000 with spreads of ~0.3: E[r^2]-E[r]^2 in fp32 loses every digit of the variance
    (ulp(1e6) = 0.06 vs var ~0.1); two-pass keeps ~1e-4 relative error. 2e-3 separates the two."""
    gen = torch.Generator().manual_seed(0)
    group_index = torch.arange(8).repeat_interleave(16)[torch.randperm(128, generator=gen)]
    rewards = 1000.0 + 0.3 * torch.randn(128, generator=gen)
    got = grpo_advantages(rewards, group_index)
    torch.testing.assert_close(got.double(), loop_oracle(rewards, group_index), atol=2e-3, rtol=2e-3)


def test_float64_and_bf16_dtypes():
    """fp64 rewards keep fp64 on the reference path (1e-12); bf16 rewards come back bf16, computed in fp32."""
    rewards, group_index = _random_batch(5, 50, 6)
    got64 = grpo_advantages_reference(rewards.double(), group_index)
    torch.testing.assert_close(got64, loop_oracle(rewards.double(), group_index), atol=1e-12, rtol=1e-12)
    got16 = grpo_advantages(rewards.bfloat16(), group_index)
    assert got16.dtype == torch.bfloat16
    oracle16 = loop_oracle(rewards.bfloat16(), group_index)
    torch.testing.assert_close(got16.double(), oracle16, atol=2e-2, rtol=2e-2)


def test_triton_equals_reference(monkeypatch):
    """The interpreter-run kernel against the reference on one larger batch with many groups of mixed
    size (both fp32; identical maths up to summation order)."""
    rewards, group_index = _random_batch(11, 1000, 90)
    monkeypatch.setenv("LINGSHU_KERNELS", "triton")
    got = grpo_advantages(rewards, group_index)
    torch.testing.assert_close(got, grpo_advantages_reference(rewards, group_index), atol=2e-6, rtol=2e-6)


def test_empty_batch(kernels_mode):
    got = grpo_advantages(torch.empty(0), torch.empty(0, dtype=torch.long))
    assert got.shape == (0,)


def test_clear_errors():
    with pytest.raises(ValueError, match="rewards \\[B\\] and group_index \\[B\\]"):
        grpo_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer group ids"):
        grpo_advantages(torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match="floating"):
        grpo_advantages(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
