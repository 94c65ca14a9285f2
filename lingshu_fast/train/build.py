"""Everything a stage needs, built from the config: device, tokenizer, model, optimizer, data, runner."""
from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from megatron.core import parallel_state as ps

from lingshu_fast.config import Config, ConfigError
from lingshu_fast.data.loader import PackedLoader, resolve_max_steps
from lingshu_fast.data.tokenizer import load_tokenizer
from lingshu_fast.model import (
    from_pretrained,
    load_hf_config,
    param_groups,
    save_pretrained,
    set_trainable,
    training_flops,
)
from lingshu_fast.model.chunks import rank_model
from lingshu_fast.parallel.state import ParallelDims
from lingshu_fast.train.layout import mark_tied_copies, rank_layer_kwargs
from lingshu_fast.train.optim import build_optimizer, build_scheduler
from lingshu_fast.train.runner import build_runner
from lingshu_fast.train.tiny import ensure_tiny_model

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    runner: Any  # train.runner.LocalRunner or PipelineRunner: run(micro_batches, first_forward, loss_of)
    device: torch.device
    tokenizer: Any
    flops_of: Callable  # MicroBatch -> training FLOPs of the whole model on it
    export: Callable  # folder -> None (HF export, collective)


def pick_device(dims: ParallelDims) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dims.local_rank)
    return torch.device("cpu")


def pick_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_model_path(cfg: Config, tokenizer) -> str:
    if cfg.model.init_from:
        path = Path(cfg.model.init_from)
        if not (path / "config.json").exists():
            raise ConfigError(f"model.init_from={cfg.model.init_from!r} is not a Hugging Face folder "
                              f"(no config.json); point it at a previous stage's run.dir/hf")
        return str(path)
    if cfg.model.path == "tiny":
        return str(ensure_tiny_model(Path(cfg.run.dir) / "tiny_init", tokenizer, seed=cfg.run.seed))
    if not (Path(cfg.model.path) / "config.json").exists():
        raise ConfigError(f"model.path={cfg.model.path!r} is not a Hugging Face Qwen2.5-VL folder (no config.json)")
    return cfg.model.path


def prepare_run(cfg: Config, dims: ParallelDims) -> tuple[torch.device, torch.dtype, Any, str]:
    """What every stage starts with: (device, dtype, tokenizer, model path), RNGs seeded, and the
    model's config.json copied into the run folder (`lingshu-fast export` rebuilds the skeleton from it)."""
    device = pick_device(dims)
    dtype = pick_dtype(cfg, device)
    seed_everything(cfg.run.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model_path = resolve_model_path(cfg, tokenizer)
    if dims.rank == 0:
        (Path(cfg.run.dir) / "model_config").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(model_path) / "config.json", Path(cfg.run.dir) / "model_config" / "config.json")
    return device, dtype, tokenizer, model_path


def hf_exporter(model, tokenizer, dims: ParallelDims) -> Callable[[Path], None]:
    """The end-of-stage export: the HF folder (collective over all ranks) with the tokenizer beside it."""
    def export(folder: Path) -> None:  # replaces the previous export there (a resumed run), nothing else
        save_pretrained(model, str(folder), extra_files=tokenizer.save_pretrained if dims.rank == 0 else None)

    return export


def build_rank_model(cfg: Config, dims: ParallelDims, model_path: str, *, dtype: torch.dtype,
                     device: torch.device, frozen: bool = False) -> torch.nn.Module:
    """This rank's model: one `Qwen25VLModel` per pipeline chunk of the rank (several, in a
    `ModelChunks`, under the interleaved schedule), TP-sharded. `frozen=True` gives stage 4's
    reference model: eval mode, no gradients, no activation checkpointing."""
    model = rank_model([from_pretrained(model_path, dtype=dtype, device=device,
                                        activation_checkpointing="none" if frozen else cfg.model.activation_checkpointing,
                                        checkpoint_every_k_layers=cfg.model.checkpoint_every_k_layers,
                                        attention_backend=cfg.model.attention,
                                        sequence_parallel=cfg.parallel.sequence_parallel, **layers)
                        for layers in rank_layer_kwargs(load_hf_config(model_path), dims, cfg)])
    if frozen:
        model.eval().requires_grad_(False)
    return model


def build_trainable(cfg: Config, dims: ParallelDims, model_path: str, *, dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """(model, optimizer, LR schedule) of every stage: the rank's model with `model.freeze` applied,
    AdamW over its parameter groups (ZeRO-1 over DP when asked), and the warmup/decay schedule."""
    model = build_rank_model(cfg, dims, model_path, dtype=dtype, device=device)
    set_trainable(model, cfg.model.freeze)
    groups = param_groups(model)
    if not any(p.requires_grad for p in model.parameters()) and dims.pp == 1:
        raise ConfigError(f"model.freeze={cfg.model.freeze} freezes every parameter: nothing to train")
    mark_tied_copies(model, dims)  # before the optimizer: its grad buffers place tied copies apart
    optimizer = build_optimizer(groups, cfg.optim, dp_group=ps.get_data_parallel_group() if dims.dp > 1 else None,
                                model=model, overlap_grad_reduce=cfg.parallel.virtual_stages == 1)
    return model, optimizer, build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)


def microbatches_per_rank(cfg: Config, dims: ParallelDims) -> int:
    """Packed micro-batches each data-parallel rank takes per step (train.global_microbatches / DP)."""
    g = cfg.train.global_microbatches
    if g % dims.dp:
        raise ConfigError(f"train.global_microbatches={g} is not divisible by the data-parallel size {dims.dp} "
                          f"(world {dims.world} / (tp {dims.tp} * pp {dims.pp})); pick a multiple of {dims.dp}")
    return g // dims.dp


def build_state(cfg: Config, dims: ParallelDims) -> TrainState:
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give one or more JSONL files (data.train=[a.jsonl,b.jsonl])")
    device, dtype, tokenizer, model_path = prepare_run(cfg, dims)
    loader = PackedLoader(cfg.data.train, tokenizer, cfg.data, dp_rank=dims.dp_rank, dp_size=dims.dp,
                          seed=cfg.run.seed, epochs=cfg.train.epochs, device=device)
    # before the LR schedule is built: null (or more than the data holds) -> the steps of train.epochs
    per_step = microbatches_per_rank(cfg, dims)
    enough = None if cfg.train.max_steps is None else cfg.train.max_steps * per_step
    cfg.train.max_steps = resolve_max_steps(cfg.train.max_steps, loader.total_microbatches(enough) // per_step,
                                            epochs=cfg.train.epochs)
    model, optimizer, scheduler = build_trainable(cfg, dims, model_path, dtype=dtype, device=device)
    runner = build_runner(model, dims, schedule=cfg.parallel.pp_schedule, tokens=cfg.data.max_tokens_per_microbatch,
                          per_rank=per_step)
    hf_config = model.config

    def flops_of(mb) -> float:
        return training_flops(hf_config, mb.segment_lengths, mb.image_grid_thw)

    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, runner=runner,
                      device=device, tokenizer=tokenizer, flops_of=flops_of,
                      export=hf_exporter(model, tokenizer, dims))
