"""`lingshu-fast export CHECKPOINT HF_DIR`: a training checkpoint -> a Hugging Face folder.

Checkpoints hold per-rank shards, so the export runs on the layout that wrote them: a checkpoint
of a single-process run exports in one process; one written by N ranks needs
`torchrun --nproc_per_node N -m lingshu_fast.cli export CHECKPOINT HF_DIR` (same TP/PP). The model
skeleton comes from the run's `model_config/config.json`, the layout from the run's `config.yaml`,
the weights from the checkpoint; `save_pretrained` gathers the shards and writes atomically (the
tokenizer inside the same atomic folder).

HF_DIR must be new, empty, or a previous export (replaced only with `--overwrite`): a folder
holding anything else - the run folder itself, a checkpoint, a user's files - is refused before
anything is loaded, and nothing is deleted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from lingshu_fast.config import ConfigError, load_config


def _run_dir_of(checkpoint: Path) -> Path:
    # run_dir/checkpoints/step_000123
    run_dir = checkpoint.resolve().parent.parent
    if not (run_dir / "config.yaml").exists() or not (run_dir / "model_config" / "config.json").exists():
        raise ConfigError(f"{checkpoint} is not inside a lingshu-fast run folder (expected "
                          f"{run_dir}/config.yaml and {run_dir}/model_config/config.json)")
    return run_dir


def export_checkpoint(checkpoint: str, hf_dir: str, *, overwrite: bool = False) -> Path:
    from lingshu_fast.data.tokenizer import load_tokenizer
    from lingshu_fast.model import build_model, load_hf_config, save_pretrained
    from lingshu_fast.model.export_folder import export_target_problem
    from lingshu_fast.parallel.pipeline import rank_layer_kwargs, rank_model
    from lingshu_fast.parallel.state import init_parallel, shutdown_parallel
    from lingshu_fast.train import checkpoint as ckpt

    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(f"{checkpoint} does not exist: give a run folder (run.dir), its checkpoints folder "
                          f"or one checkpoint (run.dir/checkpoints/step_000123)")
    problem = export_target_problem(hf_dir, overwrite=overwrite)
    if problem is not None:  # before anything loads; save_pretrained checks again
        raise ConfigError(problem)
    run_of = path.parent if path.name == "checkpoints" else path if (path / "checkpoints").is_dir() else None
    if run_of is not None:  # a run folder or its checkpoints folder: the newest checkpoint that verifies
        latest = ckpt.find_latest(run_of, checksums=True)
        if latest is None:
            raise ConfigError(f"no complete checkpoint under {path}")
        path = latest
    problem = ckpt.validate_checkpoint(path)
    if problem is not None:
        raise ConfigError(f"{path}: {problem}")
    manifest = json.loads((path / "manifest.json").read_text())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if manifest["world"] != world:
        raise ConfigError(f"{path} was written by {manifest['world']} ranks: export it with "
                          f"`torchrun --nproc_per_node {manifest['world']} -m lingshu_fast.cli export {path} {hf_dir}`")
    run_dir = _run_dir_of(path)
    cfg = load_config(str(run_dir / "config.yaml"))
    dims = init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.backend)
    try:
        hf_config = load_hf_config(str(run_dir / "model_config"))
        model = rank_model([build_model(hf_config, **layers) for layers in rank_layer_kwargs(hf_config, dims, cfg)])
        saved = ckpt.load_checkpoint(path, dims.rank, world=dims.world)
        model.load_state_dict(saved["model_state"])
        tokenizer = load_tokenizer(cfg.data.tokenizer) if dims.rank == 0 else None
        save_pretrained(model, hf_dir, overwrite=overwrite,
                        extra_files=None if tokenizer is None else tokenizer.save_pretrained)
        if dims.rank == 0:
            print(f"lingshu-fast: exported {path} (step {saved['step']}) to {hf_dir}", flush=True)
    finally:
        shutdown_parallel()
    return Path(hf_dir)
