"""Rewards of one rollout must be identical on every rank of a TP x PP group.

Every rank of a model-parallel group decodes the same responses, but verifiers run in a pool with
per-call time limits, so one rank can score a response 0 (timed out under load) where another
scores 1. Different rewards on the ranks of one group give different advantages and, with
rl.filter_equal_groups, different micro-batches: mismatched TP collectives and pipeline schedules
(a hang). The test stands in for a timeout with a reward that reads the process's rank.
"""
import numpy as np
import pytest

from lingshu_fast.data.prompt import Prompt
from lingshu_fast.model.generate import GenerationOutput
from lingshu_fast.parallel.spawn import spawn
from lingshu_fast.rl.rewards import register_reward, registered_rewards


def _rank_dependent_reward(response: str, sample: dict) -> float:
    import torch.distributed as dist

    return float(dist.get_rank())  # what a verifier that times out on one rank only looks like


if "rank_dependent" not in registered_rewards():
    register_reward("rank_dependent", inline=True)(_rank_dependent_reward)


class _Dataset:
    token_ids = {"im_end_id": 7, "image_token_id": 90, "video_token_id": 91, "vision_start_token_id": 92,
                 "vision_end_token_id": 93}

    bad, skipped = set(), 0  # no unreadable prompts

    def prompt(self, i):
        return Prompt(np.arange(4, dtype=np.int64), np.tile(np.arange(4, dtype=np.int64), (3, 1)))

    def usable_prompts(self, indices):
        return [(i, self.prompt(i)) for i in indices]

    def verifier_sample(self, i):
        return {"answer": "x"}


class _Backend:
    def generate_rollout(self, dataset, indices, rl_cfg, *, stop_token_ids):
        return [GenerationOutput(token_ids=[10, 7], logprobs=[-1.0, -1.0], finished=True)
                for _ in range(len(indices) * rl_cfg.num_generations)]


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def _rollout_rewards(dims):
    from lingshu_fast.rl.rollout import collect_rollout

    rl = type("RL", (), dict(num_generations=2, rewards=["rank_dependent:1.0"], reward_timeout_s=5.0))()
    ro = collect_rollout(None, _Dataset(), [0, 1], rl, _Tokenizer(), seed=0, backend=_Backend())
    return ro.rewards.tolist(), ro.breakdown["rank_dependent"].tolist(), ro.failures


@pytest.mark.dist
def test_ranks_of_a_model_parallel_group_share_one_scoring():
    """Pins: under TP=2 x PP=2 every rank of the group returns the scores of the group's first rank
    (rank 0 here: all zeros), whatever its own verifier calls gave. Exact equality: the values are
    copied, not recomputed."""
    ranks = spawn(_rollout_rewards, 4, tp=2, pp=2)
    assert all(r == ([0.0] * 4, [0.0] * 4, 0) for r in ranks), ranks
