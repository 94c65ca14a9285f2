"""Stage 4, GRPO with verifiable rewards: rollout, score, advantages, clipped updates, log, checkpoint.

Launch: `lingshu-fast train RECIPE` with `train.stage: 4` (the CLI calls `train_rl`), or under
torchrun like stages 1-3. One rollout: the next rl.rollout_batch prompts of the stream (split over
the DP ranks), rl.num_generations responses each from our generator, rewards from rl.rewards.
Advantages are GRPO's, per group (groups never cross ranks). The rollout's groups are split in
rl.updates_per_rollout equal chunks, one optimizer update (= one `step`, what train.max_steps
counts) each. With more than one update per rollout, `old_logprobs` are the policy's own
log-probs before the first update (token_logprobs, the very arithmetic of the loss, so the first
update's ratio is exactly 1); with one, the update is on-policy (ratio 1, no old log-probs).
rl.beta > 0 loads a frozen reference model from the same initial weights; its log-probs are
computed without logits. rl.filter_equal_groups drops groups whose rewards are all equal (DAPO's
dynamic sampling without the re-sampling: they carry no advantage, only dilute the mean).

The loss of an update is rl.loss_agg over all its sequences on all DP ranks (see step.py), so
it does not depend on the DP layout. Sampling seeds derive from (run.seed, rollout, DP rank).
Metrics: reward_* / accuracy / format_rate / response_len are the rollout's (repeated on each of
its updates); `tokens_per_s_per_gpu` and `mfu` cover the update (forward+backward, plus its share
of the old/reference log-prob passes), not generation, which `rollout_tokens_per_s` reports
(generated tokens over all ranks / the slowest rank's generation time). The prompt stream is
train.epochs epochs long: train.max_steps (null: all of them) is cut to the updates they give.

Resume and checkpoints are stages 1-3's (`train.session.StageRun`: model, optimizer, schedule, RNG,
prompt position), taken only between rollouts: a checkpoint due (checkpoint.every) in the
middle of a rollout is written after its last update. A run whose max_steps ends inside a rollout
drops that rollout's remaining updates (a later, longer run starts a fresh rollout).

Rollout backend: our generator (rl.backend=native), or a vLLM server the user started
(rl.backend=vllm, `rl/vllm_backend.py`): the policy is pushed to it at start and after each
rollout's updates (not after the last step), so every rollout samples the current policy; old
log-probs are always recomputed with our model (token_logprobs), never taken from the server.

Layouts: TP, PP and DP as stages 1-3 (the same per-chunk model, checkpoints and schedules). Under
parallel.pp > 1 the generator and the old/reference log-prob passes run stage by stage
(`parallel.relay`; every rank of a pipeline gets the same rollout), and the updates go through
the pipeline schedule (the step engine's `PipelineRunner`): micro-batches padded to
data.max_tokens_per_microbatch, so a prompt + response (data.max_length) must fit that budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch.distributed as dist

from lingshu_fast.config import Config, ConfigError
from lingshu_fast.data.loader import resolve_max_steps
from lingshu_fast.model import training_flops
from lingshu_fast.parallel.data_parallel import allreduce_floats
from lingshu_fast.parallel.state import ParallelDims
from lingshu_fast.rl.advantages import rollout_advantages
from lingshu_fast.rl.rewards import parse_reward_spec
from lingshu_fast.rl.rollout import PromptDataset, Rollout, collect_rollout
from lingshu_fast.rl.step import STAT_KEYS, grpo_closures, norm_count, pack_sequences, sequence_logprobs
from lingshu_fast.train.build import TrainState, build_rank_model, build_trainable, hf_exporter, prepare_run
from lingshu_fast.train.runner import build_runner
from lingshu_fast.train.session import Evaluator, StageRun


@dataclass
class RLState(TrainState):
    ref_model: Any = None  # the frozen reference (rl.beta > 0), the same chunks as the policy


def _check_layout(cfg: Config, dims: ParallelDims) -> None:
    """The stage-4 settings this layout cannot run, each a one-line ConfigError before any model loads."""
    rl = cfg.rl
    if dims.pp > 1 and cfg.data.max_length > cfg.data.max_tokens_per_microbatch:
        raise ConfigError(f"data.max_length={cfg.data.max_length} (prompt + response) exceeds "
                          f"data.max_tokens_per_microbatch={cfg.data.max_tokens_per_microbatch}: under "
                          f"parallel.pp > 1 every sequence must fit the pipeline's fixed micro-batch; lower the "
                          f"first or raise the second")
    if rl.updates_per_rollout < 1:
        raise ConfigError(f"rl.updates_per_rollout must be >= 1, got {rl.updates_per_rollout}")
    if rl.rollout_batch % (dims.dp * rl.updates_per_rollout):
        raise ConfigError(f"rl.rollout_batch={rl.rollout_batch} prompts must divide into data-parallel size "
                          f"{dims.dp} x rl.updates_per_rollout={rl.updates_per_rollout}; pick a multiple of "
                          f"{dims.dp * rl.updates_per_rollout}")
    if rl.backend == "vllm" and not (rl.vllm_url and rl.vllm_sync_dir):
        raise ConfigError("rl.backend=vllm needs rl.vllm_url (the vLLM server you started) and rl.vllm_sync_dir "
                          "(the folder it was started on); see lingshu_fast/rl/vllm_backend.py")
    if rl.temperature <= 0:
        raise ConfigError(f"rl.temperature must be > 0 for GRPO sampling, got {rl.temperature}")
    parse_reward_spec(rl.rewards)  # a typo fails before the models load


def build_rl_state(cfg: Config, dims: ParallelDims) -> RLState:
    """The policy's TrainState with the prompt stream as its loader, and the frozen reference model."""
    _check_layout(cfg, dims)
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give one or more RL JSONL files (records with 'answer')")
    device, dtype, tokenizer, model_path = prepare_run(cfg, dims)
    prompts = PromptDataset(cfg.data.train, tokenizer, cfg.data, max_new_tokens=cfg.rl.max_new_tokens,
                            dp_rank=dims.dp_rank, dp_size=dims.dp, seed=cfg.run.seed, epochs=cfg.train.epochs)
    cfg.train.max_steps = resolve_max_steps(cfg.train.max_steps, prompts.available_updates(
        cfg.rl.rollout_batch, cfg.rl.updates_per_rollout), epochs=cfg.train.epochs, what="updates")
    model, optimizer, scheduler = build_trainable(cfg, dims, model_path, dtype=dtype, device=device)
    ref_model = None
    if cfg.rl.beta != 0.0:  # the same chunks as the policy: its log-probs meet the loss on the last stage
        ref_model = build_rank_model(cfg, dims, model_path, dtype=dtype, device=device, frozen=True)
    # packing decides each update's micro-batch count: a pipeline runner builds a schedule per count
    runner = build_runner(model, dims, schedule=cfg.parallel.pp_schedule, tokens=cfg.data.max_tokens_per_microbatch)
    hf_config = model.config

    def flops_of(rmb) -> float:
        return training_flops(hf_config, rmb.mb.segment_lengths, rmb.prompt_grid_thw)

    return RLState(model=model, optimizer=optimizer, scheduler=scheduler, loader=prompts, runner=runner,
                   device=device, tokenizer=tokenizer, flops_of=flops_of, export=hf_exporter(model, tokenizer, dims),
                   ref_model=ref_model)


def _rollout_seed(seed: int, rollout: int, dp_rank: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(rollout), int(dp_rank)]).generate_state(1)[0])


def _rollout_stats(ro: Rollout, dp_group, generate_s: float, filtered: int) -> dict:
    """Rollout-wide metrics over all DP ranks (two batched collectives: sums, then the slowest time)."""
    rewards = ro.rewards.astype(np.float64)
    scores = [ro.breakdown.get(name) for name in ("accuracy", "format")]
    n, total, sq, tokens, finished, failures, filtered_sum, *score_sums = allreduce_floats(
        [len(rewards), rewards.sum(), (rewards ** 2).sum(), ro.response_tokens, ro.finished.sum(), ro.failures,
         filtered, *[0.0 if s is None else s.sum() for s in scores]], dp_group)
    slowest_s = allreduce_floats([generate_s], dp_group, op=dist.ReduceOp.MAX)[0]
    mean, n = total / max(n, 1), max(n, 1)
    return {"reward_mean": mean, "reward_std": math.sqrt(max(sq / n - mean * mean, 0.0)),
            "accuracy": None if scores[0] is None else score_sums[0] / n,
            "format_rate": None if scores[1] is None else score_sums[1] / n,
            "response_len": tokens / n, "rollout_tokens_per_s": tokens / max(slowest_s, 1e-9),
            "rollout_time_s": slowest_s, "finished_rate": finished / n, "reward_failures": int(failures),
            "filtered_groups": int(filtered_sum), "skipped_samples": ro.skipped_samples}


def _plan_updates(ro: Rollout, cfg: Config, *, token_multiple: int = 1,
                  pad_token_id: int = 0) -> tuple[list[list], int]:
    """Advantages, optional equal-group filtering, and the packed micro-batches of each update."""
    g = cfg.rl.num_generations
    advantages = rollout_advantages(ro.rewards, ro.seq_prompt)
    n_groups = len(ro.prompts)
    per_group = ro.rewards.reshape(n_groups, g)
    keep = np.ones(n_groups, dtype=bool)
    if cfg.rl.filter_equal_groups:
        keep = per_group.max(axis=1) > per_group.min(axis=1)
    per_update = n_groups // cfg.rl.updates_per_rollout
    updates = []
    for u in range(cfg.rl.updates_per_rollout):
        seq_ids = [s for k in range(u * per_update, (u + 1) * per_update) if keep[k] for s in range(k * g, (k + 1) * g)]
        updates.append(pack_sequences(ro.prompts, ro.seq_prompt, ro.responses, advantages, seq_ids,
                                      cfg.data.max_tokens_per_microbatch, token_multiple=token_multiple,
                                      pad_token_id=pad_token_id))
    return updates, int((~keep).sum())


def _rollout(run: StageRun, backend, rollout_index: int) -> tuple[list, dict, float]:
    """One rollout: sample, score, plan the updates and take the old/reference log-probs before any
    update. Returns (updates, rollout metrics, the log-prob passes' seconds per update)."""
    cfg, state, rl = run.cfg, run.state, run.cfg.rl
    indices = state.loader.next_indices(rl.rollout_batch)
    ro = collect_rollout(state.model, state.loader, indices, rl, state.tokenizer,
                         seed=_rollout_seed(cfg.run.seed, rollout_index, run.dims.dp_rank), backend=backend)
    model = state.model
    token_multiple = model.tp if getattr(model, "sequence_parallel", False) else 1
    updates, filtered = _plan_updates(ro, cfg, token_multiple=token_multiple,
                                      pad_token_id=state.loader.token_ids["pad_token_id"])
    stats = _rollout_stats(ro, run.engine.dp_group, ro.generate_s, filtered)
    prep = run.timer()
    tp_group = state.runner.tp_group
    for rmbs in updates:
        for rmb in rmbs:
            moved = rmb.to(state.device)
            if rl.updates_per_rollout > 1:
                rmb.old_logprobs = sequence_logprobs(model, moved, temperature=rl.temperature, tp_group=tp_group)
            if state.ref_model is not None:
                rmb.ref_logprobs = sequence_logprobs(state.ref_model, moved, temperature=rl.temperature,
                                                     tp_group=tp_group)
    return updates, stats, prep.stop() / max(rl.updates_per_rollout, 1)


def _vllm_backend(cfg: Config, state, start: int):
    """rl.backend=vllm: the client, after pushing the (resumed) policy; None for our own generator."""
    if cfg.rl.backend != "vllm":
        return None
    from lingshu_fast.rl.vllm_backend import VLLMClient

    backend = VLLMClient(cfg.rl.vllm_url, vocab_size=state.model.config.text_config.vocab_size,
                         sync_dir=cfg.rl.vllm_sync_dir, tokenizer=state.tokenizer, timeout_s=cfg.rl.vllm_timeout_s)
    backend.push_weights(state.model, start)  # the server samples the (resumed) policy, not its start-up folder
    return backend


def train_rl(cfg: Config, dims: Optional[ParallelDims] = None, evaluate: Optional[Evaluator] = None) -> dict:
    """Run (or resume) stage 4; returns a summary for the demo (reward_start/reward_end included)."""
    with StageRun(cfg, dims, build_rl_state, evaluate) as run:
        state, rl = run.state, cfg.rl
        backend = _vllm_backend(cfg, state, run.start)
        pad_token_id = state.loader.token_ids["pad_token_id"]
        rollout_index = math.ceil(run.start / rl.updates_per_rollout)
        run.summary.update(reward_start=None, reward_end=None)
        while run.step < cfg.train.max_steps:
            updates, ro_stats, prep_s = _rollout(run, backend, rollout_index)
            rollout_index += 1
            save_due = updated = False
            for rmbs in updates[:cfg.train.max_steps - run.step]:
                step, timer = run.step + 1, run.timer()
                host = {"tokens": sum(r.mb.num_tokens for r in rmbs), "flops": sum(state.flops_of(r) for r in rmbs)}
                result = run.engine.step(*grpo_closures(state.runner, rmbs, rl, pad_token_id), step=step,
                                         count=sum(norm_count(r, rl.loss_agg) for r in rmbs), host=host,
                                         stat_keys=STAT_KEYS)
                masked = max(result.stats["masked_tokens"], 1.0)
                run.log(step, result, timer.stop() + prep_s, kl=result.stats["kl"] / masked,
                        clip_frac=result.stats["clip_frac"] / masked, label_tokens=int(result.stats["masked_tokens"]),
                        **ro_stats)
                if run.summary["reward_start"] is None:
                    run.summary["reward_start"] = ro_stats["reward_mean"]
                run.summary["reward_end"] = ro_stats["reward_mean"]
                updated, save_due = updated or result.updated, save_due or run.checkpoint_due(step)
            if backend is not None and updated and run.step < cfg.train.max_steps:
                state.optimizer.buffers.wait_params()  # an overlapped parameter gather must be complete
                backend.push_weights(state.model, run.step)  # collective; the next rollout samples the new policy
            if save_due:
                run.save(run.step)
        return run.finish()
