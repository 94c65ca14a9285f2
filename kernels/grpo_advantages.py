"""GRPO group-normalised advantages: `(r - mean_g) / (std_g + eps)` per rollout, or `r - mean_g`.

`grpo_advantages(rewards [B], group_index [B], *, std_normalize=True, eps=1e-6) -> [B]`

Definitions (verl's `compute_grpo_outcome_advantage`, TRL's GRPOTrainer):
- `std_g` is the UNBIASED standard deviation of the group's rewards (torch.std's default, divisor n-1);
- a group of one gets advantage 0. This is a deliberate deviation from verl, which gives a lone rollout
  mean 0 and std 1 (advantage r / (1 + eps)): a lone rollout has no baseline, so it carries no signal;
- a group whose rewards are all equal has std 0 and gets 0 / (0 + eps) = 0.
Group ids are arbitrary integers: non-contiguous, unsorted, any group sizes. No Python loop over groups.

Numerics: the variance is the mean of squared deviations from the group mean (two passes over the
group), never E[r^2] - E[r]^2, which cancels catastrophically when rewards are large and close
(e.g. 1000.1 vs 1000.2 in fp32). Both paths accumulate in fp32 (fp64 when the rewards are fp64 on the
reference path) and return the rewards' dtype.

Two paths behind `use_triton(rewards)`:
- reference: compact the ids with `torch.unique(return_inverse=True)`, then `index_add_` segment sums
  (count, sum, then sum of squared deviations) - three scatter passes, no loop;
- Triton: a stable sort by group id makes every group a contiguous segment of the sorted order; one
  kernel program per sorted position, of which only a segment's head does work: it walks its segment
  twice (mean, then squared deviations) and writes the normalised advantages back through the
  permutation. No atomics, so the result is deterministic (the atomic-add alternative reorders float
  sums run to run), and the grid is the batch size, so the number of groups is never synchronised to
  the host (the launch is CUDA-graph friendly). Rollout batches are small (hundreds to thousands), so
  this op costs microseconds either way; the kernel exists so the RL step never leaves the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import AotSpec
from ._dispatch import use_triton

_BLOCK = 128  # rollouts read per loop step by a segment's head program
_NUM_WARPS, _NUM_STAGES = 4, 3  # as launched (3: triton's default); the AOT spec compiles the same


def _check(rewards: torch.Tensor, group_index: torch.Tensor, eps: float) -> None:
    if rewards.dim() != 1 or group_index.dim() != 1 or rewards.shape != group_index.shape:
        raise ValueError(
            f"grpo_advantages expects rewards [B] and group_index [B]; got {tuple(rewards.shape)} "
            f"and {tuple(group_index.shape)}"
        )
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating tensor, got {rewards.dtype} (cast with .float())")
    if group_index.is_floating_point() or group_index.dtype == torch.bool:
        raise TypeError(f"group_index must hold integer group ids, got {group_index.dtype}")
    if rewards.device != group_index.device:
        raise ValueError(f"rewards on {rewards.device} but group_index on {group_index.device}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def grpo_advantages_reference(
    rewards: torch.Tensor, group_index: torch.Tensor, *, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Plain-PyTorch path (CPU, tests): segment sums with index_add_, two-pass variance."""
    acc_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(acc_dtype)
    group_ids, group = torch.unique(group_index, return_inverse=True)
    n_groups = group_ids.numel()
    count = torch.zeros(n_groups, dtype=acc_dtype, device=r.device).index_add_(0, group, torch.ones_like(r))
    total = torch.zeros(n_groups, dtype=acc_dtype, device=r.device).index_add_(0, group, r)
    deviation = r - (total / count)[group]
    if std_normalize:
        sq_dev = torch.zeros(n_groups, dtype=acc_dtype, device=r.device).index_add_(0, group, deviation * deviation)
        std = (sq_dev / (count - 1).clamp_min(1)).sqrt()  # unbiased; lone groups are zeroed below
        deviation = deviation / (std[group] + eps)
    lone = count[group] < 2
    return torch.where(lone, torch.zeros_like(deviation), deviation).to(rewards.dtype)


@triton.jit
def _grpo_advantages_kernel(
    rewards_ptr,  # *fp32 [B], original order
    perm_ptr,  # *i64 [B], sorted position -> original index (stable sort by group id)
    seg_end_ptr,  # *i64 [B], sorted position -> one past the end of its segment (valid at heads)
    is_head_ptr,  # *i8 [B], 1 where a sorted position starts a segment
    out_ptr,  # *fp32 [B], original order
    eps,  # fp32
    STD_NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0)
    is_head = tl.load(is_head_ptr + start)
    if is_head != 0:
        end = tl.load(seg_end_ptr + start).to(tl.int32)
        count = (end - start).to(tl.float32)
        lanes = tl.arange(0, BLOCK)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(start, end, BLOCK):
            pos = off + lanes
            live = pos < end
            idx = tl.load(perm_ptr + pos, mask=live, other=0)
            total += tl.load(rewards_ptr + idx, mask=live, other=0.0)
        mean = tl.sum(total, axis=0) / count
        inv_scale = 1.0
        if STD_NORMALIZE:
            sq_dev = tl.zeros([BLOCK], dtype=tl.float32)
            for off in range(start, end, BLOCK):
                pos = off + lanes
                live = pos < end
                idx = tl.load(perm_ptr + pos, mask=live, other=0)
                dev = tl.load(rewards_ptr + idx, mask=live, other=0.0) - mean
                sq_dev += tl.where(live, dev * dev, 0.0)
            var = tl.sum(sq_dev, axis=0) / tl.maximum(count - 1.0, 1.0)
            inv_scale = 1.0 / (tl.sqrt(var) + eps)
        # A lone rollout has no baseline: advantage 0 (see the module docstring).
        keep = tl.where(count > 1.0, 1.0, 0.0)
        for off in range(start, end, BLOCK):
            pos = off + lanes
            live = pos < end
            idx = tl.load(perm_ptr + pos, mask=live, other=0)
            dev = tl.load(rewards_ptr + idx, mask=live, other=0.0) - mean
            tl.store(out_ptr + idx, dev * inv_scale * keep, mask=live)


def _grpo_advantages_triton(
    rewards: torch.Tensor, group_index: torch.Tensor, std_normalize: bool, eps: float
) -> torch.Tensor:
    n = rewards.numel()
    out = torch.empty(n, dtype=torch.float32, device=rewards.device)
    if n == 0:
        return out.to(rewards.dtype)
    sorted_ids, perm = torch.sort(group_index, stable=True)
    is_head = torch.ones(n, dtype=torch.bool, device=rewards.device)
    is_head[1:] = sorted_ids[1:] != sorted_ids[:-1]
    # Segment end for every sorted position: the next head at or after i+1, found by a reversed cummin
    # of head positions (n where there is none). Only heads read it.
    positions = torch.arange(n, device=rewards.device)
    next_head = torch.where(is_head, positions, torch.full_like(positions, n))
    seg_end = torch.cat([next_head[1:], next_head.new_full((1,), n)]).flip(0).cummin(0).values.flip(0)
    _grpo_advantages_kernel[(n,)](
        rewards.to(torch.float32).contiguous(), perm.contiguous(), seg_end.contiguous(),
        is_head.to(torch.int8), out, float(eps),
        STD_NORMALIZE=bool(std_normalize), BLOCK=_BLOCK, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    return out.to(rewards.dtype)


def grpo_advantages(
    rewards: torch.Tensor, group_index: torch.Tensor, *, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Per-rollout GRPO advantage; see the module docstring for the exact definition."""
    _check(rewards, group_index, eps)
    if use_triton(rewards, group_index):
        return _grpo_advantages_triton(rewards, group_index, std_normalize, eps)
    return grpo_advantages_reference(rewards, group_index, std_normalize=std_normalize, eps=eps)


def aot_specs() -> list[AotSpec]:
    signature = {
        "rewards_ptr": "*fp32", "perm_ptr": "*i64", "seg_end_ptr": "*i64", "is_head_ptr": "*i8",
        "out_ptr": "*fp32", "eps": "fp32", "STD_NORMALIZE": "constexpr", "BLOCK": "constexpr",
    }
    return [
        AotSpec(
            name=f"grpo_advantages[std_normalize={std},BLOCK={_BLOCK}]",
            fn=_grpo_advantages_kernel,
            signature=signature,
            constexprs={"STD_NORMALIZE": std, "BLOCK": _BLOCK},
            num_warps=_NUM_WARPS,
            num_stages=_NUM_STAGES,
        )
        for std in (True, False)
    ]
