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

Resume and checkpoints reuse stages 1-3's (`train.loop._resume/_save`: model, optimizer, schedule,
RNG, prompt position), taken only between rollouts: a checkpoint due (checkpoint.every) in the
middle of a rollout is written after its last update. A run whose max_steps ends inside a rollout
drops that rollout's remaining updates (a later, longer run starts a fresh rollout).

Rollout backend: our generator (rl.backend=native), or a vLLM server the user started
(rl.backend=vllm, `rl/vllm_backend.py`): the policy is pushed to it at start and after each
rollout's updates (not after the last step), so every rollout samples the current policy; old
log-probs are always recomputed with our model (token_logprobs), never taken from the server.

Layouts: TP, PP and DP as stages 1-3 (the same per-chunk model, checkpoints and schedules). Under
parallel.pp > 1 the generator and the old/reference log-prob passes run stage by stage
(`parallel.relay`; every rank of a pipeline gets the same rollout), and the updates go through
the pipeline schedule (`rl.pipeline_step`): micro-batches padded to data.max_tokens_per_microbatch,
so a prompt + response (data.max_length) must fit that budget.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from lingshu_fast.config import Config, ConfigError
from lingshu_fast.data.loader import resolve_max_steps
from lingshu_fast.kernels import grpo_advantages
from lingshu_fast.parallel.data_parallel import allreduce_gradients, allreduce_scalar
from lingshu_fast.parallel.state import ParallelDims, init_parallel
from lingshu_fast.rl.rewards import parse_reward_spec
from lingshu_fast.rl.rollout import PromptDataset, Rollout, collect_rollout
from lingshu_fast.rl.step import forward_backward_rl, norm_count, pack_sequences, sequence_logprobs
from lingshu_fast.rl.pipeline_step import pipeline_forward_backward_rl
from lingshu_fast.train.build import TrainState, build_rank_model, build_trainable, hf_exporter, prepare_run
from lingshu_fast.train.loop import (checkpoint_due, finish_stage, parallel_groups, resume_run, save_run,
                                     start_run_dir)
from lingshu_fast.train.metrics import MetricsWriter, SkipTracker, StepTimer, all_finite, mem_gb, mfu, peak_flops_per_s
from lingshu_fast.train.optim import clip_grad_norm, current_lrs


def _check_layout(cfg: Config, dims: ParallelDims) -> int:
    """Prompts per rank per rollout."""
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
    return rl.rollout_batch // dims.dp


def build_rl_state(cfg: Config, dims: ParallelDims):
    """(TrainState with the prompt stream as its loader, frozen reference model or None)."""
    from lingshu_fast.model import training_flops
    from lingshu_fast.parallel.pipeline import PipelineRunner

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
    # packing decides each update's micro-batch count: the runner builds a schedule per count
    runner = PipelineRunner(model, dims, cfg, variable_microbatches=True) if dims.pp > 1 else None
    hf_config = model.config

    def flops_of(rmb) -> float:
        return training_flops(hf_config, rmb.mb.segment_lengths, rmb.prompt_grid_thw)

    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, loader=prompts, runner=runner,
                       device=device, tokenizer=tokenizer, flops_of=flops_of,
                       export=hf_exporter(model, tokenizer, dims))
    return state, ref_model


def _rollout_seed(seed: int, rollout: int, dp_rank: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(rollout), int(dp_rank)]).generate_state(1)[0])


def _rollout_stats(ro: Rollout, dp_group, generate_s: float) -> dict:
    """Rollout-wide metrics over all DP ranks."""
    n = allreduce_scalar(len(ro.rewards), dp_group)
    total = allreduce_scalar(float(ro.rewards.astype(np.float64).sum()), dp_group)
    sq = allreduce_scalar(float((ro.rewards.astype(np.float64) ** 2).sum()), dp_group)
    mean = total / max(n, 1)
    stats = {"reward_mean": mean, "reward_std": math.sqrt(max(sq / max(n, 1) - mean * mean, 0.0))}
    for key, name in (("accuracy", "accuracy"), ("format_rate", "format")):
        scores = ro.breakdown.get(name)
        stats[key] = None if scores is None else allreduce_scalar(float(scores.sum()), dp_group) / max(n, 1)
    tokens = allreduce_scalar(ro.response_tokens, dp_group)
    slowest_s = allreduce_scalar(generate_s, dp_group, op=dist.ReduceOp.MAX)
    stats.update(response_len=tokens / max(n, 1), rollout_tokens_per_s=tokens / max(slowest_s, 1e-9),
                 rollout_time_s=slowest_s,
                 finished_rate=allreduce_scalar(float(ro.finished.sum()), dp_group) / max(n, 1),
                 reward_failures=int(allreduce_scalar(ro.failures, dp_group)))
    return stats


def _plan_updates(ro: Rollout, cfg: Config, *, token_multiple: int = 1,
                  pad_token_id: int = 0) -> tuple[list[list], int]:
    """Advantages, optional equal-group filtering, and the packed micro-batches of each update."""
    g = cfg.rl.num_generations
    groups = torch.from_numpy(ro.seq_prompt)
    rewards = torch.from_numpy(ro.rewards)
    advantages = grpo_advantages(rewards, groups).numpy()
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


def train_rl(cfg: Config, dims: Optional[ParallelDims] = None) -> dict:
    """Run (or resume) stage 4; returns a summary for the demo (reward_start/reward_end included)."""
    dims = dims or init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.backend)
    per_rank = _check_layout(cfg, dims)
    run_dir = start_run_dir(cfg, dims)
    tp_group, dp_group, pp_group = parallel_groups()
    pp_group = pp_group if dims.pp > 1 else None
    state, ref_model = build_rl_state(cfg, dims)
    model, rl = state.model, cfg.rl
    skips = SkipTracker(cfg.train.max_consecutive_skips)
    start = resume_run(state, cfg, dims, skips)
    backend = None
    if rl.backend == "vllm":  # sampling on a vLLM server; our generator otherwise
        from lingshu_fast.rl.vllm_backend import VLLMClient

        backend = VLLMClient(rl.vllm_url, vocab_size=model.config.text_config.vocab_size,
                             sync_dir=rl.vllm_sync_dir, tokenizer=state.tokenizer, timeout_s=rl.vllm_timeout_s)
        backend.push_weights(model, start)  # the server samples the (resumed) policy, not its start-up folder
    peak = peak_flops_per_s(state.device)
    writer = MetricsWriter(cfg.run.dir, dims.rank, stage=cfg.train.stage, total_steps=cfg.train.max_steps,
                           start_step=start, tensorboard=cfg.run.tensorboard, progress=cfg.run.progress)
    params = [p for p in model.parameters() if p.requires_grad]
    upr = rl.updates_per_rollout
    token_multiple = model.tp if getattr(model, "sequence_parallel", False) else 1
    pad_token_id = state.loader.token_ids["pad_token_id"]
    summary = {"stage": cfg.train.stage, "steps": start, "loss": float("nan"), "tokens_per_s_per_gpu": 0.0,
               "mfu": None, "reward_start": None, "reward_end": None}
    step, rollout_index = start, math.ceil(start / upr)
    try:
        while step < cfg.train.max_steps:
            indices = state.loader.next_indices(rl.rollout_batch)
            assert len(indices) == per_rank
            ro = collect_rollout(model, state.loader, indices, rl, state.tokenizer,
                                 seed=_rollout_seed(cfg.run.seed, rollout_index, dims.dp_rank), backend=backend)
            rollout_index += 1
            ro_stats = _rollout_stats(ro, dp_group, ro.generate_s)
            updates, filtered = _plan_updates(ro, cfg, token_multiple=token_multiple, pad_token_id=pad_token_id)
            ro_stats["filtered_groups"] = int(allreduce_scalar(filtered, dp_group))
            prep = StepTimer(state.device).start()
            for rmbs in updates:  # log-probs of the rollout policy and the reference, before any update
                for rmb in rmbs:
                    moved = rmb.to(state.device)
                    if upr > 1:
                        rmb.old_logprobs = sequence_logprobs(model, moved, temperature=rl.temperature,
                                                             tp_group=tp_group)
                    if ref_model is not None:
                        rmb.ref_logprobs = sequence_logprobs(ref_model, moved, temperature=rl.temperature,
                                                             tp_group=tp_group)
            prep_s = prep.stop() / max(upr, 1)  # shared by the rollout's updates
            save_due, updated = False, False
            for rmbs in updates:
                if step >= cfg.train.max_steps:
                    break
                step += 1
                timer = StepTimer(state.device).start()
                state.optimizer.zero_grad(set_to_none=True)
                rmbs = [rmb.to(state.device) for rmb in rmbs]
                global_count = int(allreduce_scalar(sum(norm_count(r, rl.loss_agg) for r in rmbs), dp_group))
                if state.runner is None:
                    totals = forward_backward_rl(model, rmbs, global_count=global_count, rl_cfg=rl,
                                                 tp_group=tp_group)
                else:  # the same sums on every pipeline rank (broadcast from the last stage)
                    totals = pipeline_forward_backward_rl(state.runner, rmbs, global_count=global_count, rl_cfg=rl,
                                                          pad_token_id=pad_token_id)
                allreduce_gradients(params, dp_group)
                reduced = {k: allreduce_scalar(v, dp_group) for k, v in totals.items()}
                grad_norm = clip_grad_norm(params, cfg.optim.grad_clip, tp_group=tp_group, pp_group=pp_group)
                if global_count == 0:
                    skips.ok()  # every group filtered or empty: nothing to learn, no update
                elif all_finite(reduced["loss"], grad_norm):
                    state.optimizer.step()
                    updated = True
                    skips.ok()
                else:
                    skips.skip(step, f"loss={reduced['loss']}, grad_norm={grad_norm}")
                lrs = current_lrs(state.optimizer)
                state.scheduler.step()
                dt_s = timer.stop() + prep_s
                tokens = int(allreduce_scalar(sum(r.mb.num_tokens for r in rmbs), dp_group))
                flops = allreduce_scalar(sum(state.flops_of(r) for r in rmbs), dp_group)
                masked = max(reduced["masked_tokens"], 1.0)
                row = dict(step=step, loss=reduced["loss"], lr=max(lrs.values()) if lrs else 0.0, grad_norm=grad_norm,
                           tokens=tokens, tokens_per_s_per_gpu=tokens / dt_s / dims.world,
                           mfu=mfu(flops, dt_s, dims.world, peak), mem_gb=mem_gb(state.device),
                           kl=reduced["kl"] / masked, clip_frac=reduced["clip_frac"] / masked,
                           label_tokens=int(reduced["masked_tokens"]), skipped_steps=skips.total, step_time_s=dt_s,
                           **ro_stats, **{f"lr/{k}": v for k, v in lrs.items()})
                writer.log(**row)
                if summary["reward_start"] is None:
                    summary["reward_start"] = ro_stats["reward_mean"]
                summary.update(steps=step, loss=row["loss"], tokens_per_s_per_gpu=row["tokens_per_s_per_gpu"],
                               mfu=row["mfu"], reward_end=ro_stats["reward_mean"])
                save_due = save_due or checkpoint_due(cfg, step)
            if backend is not None and updated and step < cfg.train.max_steps:
                backend.push_weights(model, step)  # collective; the next rollout samples the updated policy
            if save_due:
                save_run(state, cfg, dims, step, skips)
        finish_stage(state, cfg, dims, step, start, skips, run_dir)
    finally:
        writer.close()
    return summary
