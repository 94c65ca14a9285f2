"""What every stage's loop shares: layout, run folder, state, resume, step engine, metrics rows,
scheduled evaluation, checkpoints and the final export (`StageRun`).

A run whose `run.dir` holds a checkpoint resumes it (model, optimizer, schedule, RNG, data
position) unless `checkpoint.resume=false`; the metrics file is cut back to the resumed step so
every step appears once. At the end the model is exported as a Hugging Face folder `run.dir/hf`,
which the next stage starts from.

Evaluation is injected (`evaluate(model, tokenizer, step=, final=) -> metrics or None`, e.g.
`lingshu_fast.eval.run.scheduled_eval` bound to the config by the CLI), so the training layers
never import the evaluation layer above them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import yaml

from lingshu_fast.config import Config
from lingshu_fast.parallel.state import ParallelDims
from lingshu_fast.plan.check import check_startup_memory
from lingshu_fast.train import checkpoint as ckpt
from lingshu_fast.train.engine import StepEngine, StepResult
from lingshu_fast.train.layout import start_parallel
from lingshu_fast.train.memory import memory_metrics, memory_report
from lingshu_fast.train.metrics import CollapseWatch, MetricsWriter, SkipTracker, StepTimer, mfu, peak_flops_per_s
from lingshu_fast.train.resume import load_latest
from lingshu_fast.train.state_io import collect_state, read_state, write_tensors

Evaluator = Callable[..., Optional[dict]]


def start_run_dir(cfg: Config, dims: ParallelDims) -> Path:
    """The run folder, with the resolved config beside the checkpoints (rank 0 writes)."""
    run_dir = Path(cfg.run.dir)
    if dims.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def resume_run(state, cfg: Config, dims: ParallelDims, skips: SkipTracker, collapse: CollapseWatch) -> int:
    """The step to continue after: that of the newest complete checkpoint in run.dir (0: none).

    The checkpoint may come from any (TP, PP, DP) layout: the tensors are read by name and sliced
    for this one; the data position is global; RNG and loader states are each rank's own when the
    layout is the same, rank 0's (remapped) otherwise. The LR schedule is this run's config's
    (optim.*, train.max_steps) at the checkpoint's step, so a longer `train.max_steps` extends the
    schedule instead of replaying the old one."""
    if not cfg.checkpoint.resume:
        return 0
    found = load_latest(cfg.run.dir, dims.rank, world=dims.world, allow_fresh_start=cfg.checkpoint.allow_fresh_start)
    if found is None:
        return 0
    path, saved = found
    run_state = saved["state"]
    read_state(state.model, state.optimizer, path, updates=int(run_state["updates"]))
    resume_schedule(state.scheduler, int(run_state["sched"]["last_epoch"]))
    same_layout = saved["layout"] == _layout(dims) and saved["rank_state"] is not None
    own = saved["rank_state"] if same_layout else run_state
    state.loader.load_state_dict(own["loader"])
    ckpt.restore_rng_state(own["rng"])
    skips.load_state_dict(run_state["skips"])
    collapse.load_state_dict(run_state.get("collapse", {}))
    step = int(run_state["step"])
    if dims.rank == 0:
        moved = "" if same_layout else f" (saved under {saved['layout']}, resharded)"
        print(f"lingshu-fast: resumed {cfg.run.dir} at step {step} from {path}{moved}", flush=True)
    return step


def resume_schedule(scheduler, last_epoch: int) -> None:
    """Put a freshly built LambdaLR at `last_epoch` steps, group LRs included."""
    scheduler.last_epoch, scheduler._step_count = last_epoch, last_epoch + 1
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(last_epoch)


def _layout(dims: ParallelDims) -> dict:
    return {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp}


def save_job(state, cfg: Config, dims: ParallelDims, step: int, skips: SkipTracker,
             collapse: CollapseWatch) -> ckpt.SaveJob:
    """Checkpoint `step` gathered into host memory (collective); the files are written by the writer."""
    tensors = collect_state(state.model, state.optimizer, stage_rank=dims.tp_rank * dims.dp + dims.dp_rank,
                            stage_size=dims.tp * dims.dp)
    rank_state = {"rng": ckpt.capture_rng_state(), "loader": state.loader.state_dict()}
    global_state = None
    if dims.rank == 0:
        global_state = {"step": step, "stage": cfg.train.stage, "updates": state.optimizer.updates,
                        "sched": {"last_epoch": state.scheduler.last_epoch}, "skips": skips.state_dict(),
                        "collapse": collapse.state_dict(), **rank_state}
    nbytes = sum(t.numel() * t.element_size() for named in tensors.values() for t in named.values())
    return ckpt.SaveJob(step=step, write_tensors=lambda folder: write_tensors(tensors, folder, dims.rank),
                        global_state=global_state, rank_state=rank_state, layout=_layout(dims), tensor_bytes=nbytes)


class StageRun:
    """One stage's run: `with StageRun(cfg, dims, build_state) as run:` ... `run.finish()`."""

    def __init__(self, cfg: Config, dims: Optional[ParallelDims], build: Callable,
                 evaluate: Optional[Evaluator] = None):
        self.cfg, self.evaluate = cfg, evaluate
        self.dims = dims = dims or start_parallel(cfg)
        check_startup_memory(cfg, dims)  # before any weight loads: one line when the layout cannot fit
        self.run_dir = start_run_dir(cfg, dims)
        self.state = state = build(cfg, dims)
        self.skips = SkipTracker(cfg.train.max_consecutive_skips)
        # ln(V) is the uniform cross-entropy: stages 1-3 only (a GRPO loss has no such level)
        self.collapse = CollapseWatch(state.model.config.text_config.vocab_size if cfg.train.stage <= 3 else None,
                                      rank=dims.rank)
        self.start = self.step = resume_run(state, cfg, dims, self.skips, self.collapse)
        self.engine = StepEngine(state.model, state.optimizer, state.scheduler, state.runner, dims,
                                 grad_clip=cfg.optim.grad_clip, skips=self.skips)
        self.checkpoints = ckpt.CheckpointWriter(cfg.run.dir, rank=dims.rank, world=dims.world,
                                                 keep=cfg.checkpoint.keep, asynchronous=cfg.checkpoint.async_save)
        self.trainable = any(p.requires_grad for p in state.model.parameters())
        self.peak = peak_flops_per_s(state.device)
        self.writer = MetricsWriter(cfg.run.dir, dims.rank, stage=cfg.train.stage, total_steps=cfg.train.max_steps,
                                    start_step=self.start, tensorboard=cfg.run.tensorboard, progress=cfg.run.progress,
                                    log_every=cfg.run.log_every)
        self.summary: dict = {"stage": cfg.train.stage, "steps": self.start, "loss": float("nan"),
                              "tokens_per_s_per_gpu": 0.0, "mfu": None}

    def __enter__(self) -> "StageRun":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.checkpoints.wait()  # a background save in flight is finished, not abandoned
        finally:
            self.writer.close()
            # the loader's builder processes end with the stage, not with the process (the demo runs its
            # stages one after another; data/workers.py also closes a pool left open at process exit)
            close = getattr(self.state.loader, "close", None)
            if close is not None:
                close()

    def timer(self) -> StepTimer:
        return StepTimer(self.state.device).start()

    def log(self, step: int, result: StepResult, dt_s: float, *, evaluate: bool = True, **extra) -> dict:
        """Write the step's metrics row (with the scheduled evaluation's figures when due) and note
        it in the summary. `result.host` must carry the step's global `tokens` and `flops`."""
        self.step = step
        tokens, world = int(result.host["tokens"]), self.dims.world
        lrs = result.lrs
        memory = memory_metrics(memory_report(self.state.model, self.state.optimizer, self.state.device))
        self.collapse.observe(step, loss=result.loss, grad_norm=result.grad_norm, count=result.count,
                              trainable=self.trainable)
        row = dict(step=step, loss=result.loss, lr=max(lrs.values()) if lrs else 0.0, grad_norm=result.grad_norm,
                   tokens=tokens, tokens_per_s_per_gpu=tokens / dt_s / world,
                   mfu=mfu(result.host["flops"], dt_s, world, self.peak), mem_gb=memory["mem_peak_gb"],
                   **memory, skipped_steps=self.skips.total, collapsed_steps=self.collapse.total,
                   step_time_s=dt_s, **extra,
                   **{f"lr/{k}": v for k, v in lrs.items()})
        evaluated = self._evaluate(step, final=step == self.cfg.train.max_steps) if evaluate else None
        self.writer.log(**row, **(evaluated or {}))
        self.summary.update(steps=step, loss=row["loss"], tokens_per_s_per_gpu=row["tokens_per_s_per_gpu"],
                            mfu=row["mfu"])
        return row

    def _evaluate(self, step: int, final: bool) -> Optional[dict]:
        if self.evaluate is None:
            return None
        evaluated = self.evaluate(self.state.model, self.state.tokenizer, step=step, final=final)  # collective
        if evaluated:
            self.summary["eval_accuracy"] = evaluated.get("eval/overall/accuracy")
        return evaluated

    def stop_early(self, reason: str) -> None:
        """The data ran out before train.max_steps: say so and evaluate the last step as final."""
        if self.dims.rank == 0:
            print(f"lingshu-fast: {reason} after {self.step} steps", flush=True)
        if self.step > self.start:
            evaluated = self._evaluate(self.step, final=True)
            if evaluated:
                self.writer.log_extra(step=self.step, **evaluated)

    def checkpoint_due(self, step: int) -> bool:
        """A periodic checkpoint after `step` (the last step is saved by `finish`)."""
        every = self.cfg.checkpoint.every
        return bool(every) and step % every == 0 and step < self.cfg.train.max_steps

    def save(self, step: int) -> None:
        self.state.optimizer.buffers.wait_params()  # the parameter gather of the last step, if overlapped
        self.checkpoints.save(save_job(self.state, self.cfg, self.dims, step, self.skips, self.collapse))

    def finish(self) -> dict:
        """The final checkpoint (when this run made steps) and the HF export the next stage starts from."""
        if self.step > self.start:
            self.save(self.step)
        self.checkpoints.wait()
        self.state.export(self.run_dir / "hf")
        return self.summary
