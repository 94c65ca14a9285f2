"""The training loop of stages 1-3: build, resume, step, log, checkpoint, export.

Launch: `lingshu-fast train RECIPE [key=value ...]` in one process, or
`torchrun --nproc_per_node G -m lingshu_fast.cli train RECIPE ...` (see README). The global batch
is `train.global_microbatches` packed micro-batches per step over all data-parallel ranks, so the
loss curve does not depend on (tp, pp, dp).

A run whose `run.dir` holds a checkpoint resumes it (model, optimizer, schedule, RNG, data
position) unless `checkpoint.resume=false`; the metrics file is cut back to the resumed step so
every step appears once. At the end the model is exported as a Hugging Face folder `run.dir/hf`,
which the next stage starts from.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch.distributed as dist
import yaml

from lingshu_fast.config import Config, ConfigError
from lingshu_fast.eval.run import append_metrics_rows, scheduled_eval
from lingshu_fast.parallel.data_parallel import allreduce_gradients, allreduce_scalar
from lingshu_fast.parallel.state import ParallelDims, init_parallel
from lingshu_fast.train import checkpoint as ckpt
from lingshu_fast.train.build import TrainState, build_state
from lingshu_fast.train.metrics import MetricsWriter, SkipTracker, StepTimer, all_finite, mem_gb, mfu, peak_flops_per_s
from lingshu_fast.train.optim import clip_grad_norm, current_lrs, load_optimizer_state_dict, optimizer_state_dict

logger = logging.getLogger(__name__)


def parallel_groups():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()


def resume_run(state: TrainState, cfg: Config, dims: ParallelDims, skips: SkipTracker) -> int:
    if not cfg.checkpoint.resume:
        return 0
    path = ckpt.find_latest(cfg.run.dir)
    if path is None:
        return 0
    saved = ckpt.load_checkpoint(path, dims.rank, world=dims.world)
    state.model.load_state_dict(saved["model_state"])
    load_optimizer_state_dict(state.optimizer, saved["optim_state"])
    state.scheduler.load_state_dict(saved["sched_state"])
    state.loader.load_state_dict(saved["loader_state"])
    ckpt.restore_rng_state(saved["rng_state"])
    skips.load_state_dict(saved["extra"]["skips"])
    step = int(saved["extra"]["step"])
    if dims.rank == 0:
        print(f"lingshu-fast: resumed {cfg.run.dir} at step {step} from {path}", flush=True)
    return step


def save_run(state: TrainState, cfg: Config, dims: ParallelDims, step: int, skips: SkipTracker) -> None:
    ckpt.save_checkpoint(
        cfg.run.dir, step,
        model_state=state.model.state_dict(),
        optim_state=optimizer_state_dict(state.optimizer),
        sched_state=state.scheduler.state_dict(),
        rng_state=ckpt.capture_rng_state(),
        loader_state=state.loader.state_dict(),
        extra={"step": step, "stage": cfg.train.stage, "world": dims.world, "tp": dims.tp, "pp": dims.pp,
               "skips": skips.state_dict()},
        rank=dims.rank, world=dims.world, keep=cfg.checkpoint.keep,
    )


def checkpoint_due(cfg: Config, step: int) -> bool:
    """A periodic checkpoint after `step` (the last step is saved by `finish_stage`)."""
    return bool(cfg.checkpoint.every) and step % cfg.checkpoint.every == 0 and step < cfg.train.max_steps


def finish_stage(state: TrainState, cfg: Config, dims: ParallelDims, step: int, start: int,
                 skips: SkipTracker, run_dir: Path) -> None:
    """The final checkpoint (when this run made steps) and the HF export the next stage starts from."""
    if step > start:
        save_run(state, cfg, dims, step, skips)
    state.export(run_dir / "hf")


def start_run_dir(cfg: Config, dims: ParallelDims) -> Path:
    """The run folder, with the resolved config beside the checkpoints (rank 0 writes)."""
    run_dir = Path(cfg.run.dir)
    if dims.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def _check_batch_layout(cfg: Config, dims: ParallelDims) -> int:
    g = cfg.train.global_microbatches
    if g % dims.dp:
        raise ConfigError(f"train.global_microbatches={g} is not divisible by the data-parallel size {dims.dp} "
                          f"(world {dims.world} / (tp {dims.tp} * pp {dims.pp})); pick a multiple of {dims.dp}")
    return g // dims.dp


def train(cfg: Config, dims: Optional[ParallelDims] = None) -> dict:
    """Run (or resume) one stage; returns a summary for the demo's table."""
    dims = dims or init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.backend)
    per_rank = _check_batch_layout(cfg, dims)
    run_dir = start_run_dir(cfg, dims)
    tp_group, dp_group, pp_group = parallel_groups()
    state = build_state(cfg, dims)
    skips = SkipTracker(cfg.train.max_consecutive_skips)
    start = resume_run(state, cfg, dims, skips)
    peak = peak_flops_per_s(state.device)
    writer = MetricsWriter(cfg.run.dir, dims.rank, stage=cfg.train.stage, total_steps=cfg.train.max_steps,
                           start_step=start, tensorboard=cfg.run.tensorboard, progress=cfg.run.progress)
    params = [p for p in state.model.parameters() if p.requires_grad]
    last = {"stage": cfg.train.stage, "steps": start, "loss": float("nan"), "tokens_per_s_per_gpu": 0.0}
    step = start
    try:
        for step in range(start + 1, cfg.train.max_steps + 1):
            timer = StepTimer(state.device).start()  # the step's time includes its wait for data
            mbs = state.loader.take_step(per_rank)
            data_wait_s = state.loader.last_wait_s
            got = int(allreduce_scalar(len(mbs), dp_group, op=dist.ReduceOp.MIN))
            if got < per_rank:
                if dims.rank == 0:
                    print(f"lingshu-fast: data exhausted after {step - 1} steps", flush=True)
                step -= 1
                if step > start:
                    evaluated = scheduled_eval(cfg, state.model, state.tokenizer, step=step, final=True)
                    if evaluated:
                        writer.flush()
                        if dims.rank == 0:
                            append_metrics_rows(cfg.run.dir, [{"stage": cfg.train.stage, "step": step, **evaluated}])
                        last["eval_accuracy"] = evaluated.get("eval/overall/accuracy")
                break
            state.optimizer.zero_grad(set_to_none=True)
            label_tokens = int(allreduce_scalar(sum(mb.num_label_tokens for mb in mbs), dp_group))
            loss_local = state.runner.forward_backward(mbs, global_label_tokens=label_tokens)
            allreduce_gradients(params, dp_group)
            loss = allreduce_scalar(loss_local, dp_group)
            if dims.pp > 1:  # only the last stage computed a loss; it equals the sum over stages
                loss = allreduce_scalar(loss, pp_group)
            grad_norm = clip_grad_norm(params, cfg.optim.grad_clip, tp_group=tp_group,
                                       pp_group=pp_group if dims.pp > 1 else None)
            if all_finite(loss, grad_norm):
                state.optimizer.step()
                skips.ok()
            else:
                skips.skip(step, f"loss={loss}, grad_norm={grad_norm}")
            lrs = current_lrs(state.optimizer)
            state.scheduler.step()
            dt_s = timer.stop()
            tokens = int(allreduce_scalar(sum(mb.num_tokens for mb in mbs), dp_group))
            flops = allreduce_scalar(sum(state.flops_of(mb) for mb in mbs), dp_group)
            row = dict(
                step=step, loss=loss, lr=max(lrs.values()) if lrs else 0.0, grad_norm=grad_norm, tokens=tokens,
                tokens_per_s_per_gpu=tokens / dt_s / dims.world, mfu=mfu(flops, dt_s, dims.world, peak),
                mem_gb=mem_gb(state.device), label_tokens=label_tokens, skipped_steps=skips.total,
                step_time_s=dt_s, data_wait_s=data_wait_s, **state.loader.skip_metrics(dp_group),
                **{f"lr/{k}": v for k, v in lrs.items()},
            )
            evaluated = scheduled_eval(cfg, state.model, state.tokenizer, step=step,
                                       final=step == cfg.train.max_steps)  # collective: every rank
            writer.log(**row, **(evaluated or {}))
            last = {"stage": cfg.train.stage, "steps": step, "loss": loss,
                    "tokens_per_s_per_gpu": row["tokens_per_s_per_gpu"], "mfu": row["mfu"]}
            if evaluated:
                last["eval_accuracy"] = evaluated.get("eval/overall/accuracy")
            if checkpoint_due(cfg, step):
                save_run(state, cfg, dims, step, skips)
        finish_stage(state, cfg, dims, step, start, skips, run_dir)
    finally:
        writer.close()
    return last
