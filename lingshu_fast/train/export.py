"""`lingshu-fast export CHECKPOINT HF_DIR`: a training checkpoint -> a Hugging Face folder.

Checkpoints hold the weights as whole tensors under their Hugging Face names (`model/`), whatever
layout wrote them, so the export is one process streaming them into an HF folder, shard by shard,
with config.json from the run's `model_config/` and the run's tokenizer, published atomically
(`checkpoint_io.export_tensor_folder`).

HF_DIR must be new, empty, or a previous export (replaced only with `--overwrite`): a folder
holding anything else - the run folder itself, a checkpoint, a user's files - is refused before
anything is loaded, and nothing is deleted.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lingshu_fast.config import ConfigError, load_config


def _run_dir_of(checkpoint: Path) -> Path:
    # run_dir/checkpoints/step_000123
    run_dir = checkpoint.resolve().parent.parent
    if not (run_dir / "config.yaml").exists() or not (run_dir / "model_config" / "config.json").exists():
        raise ConfigError(f"{checkpoint} is not inside a lingshu-fast run folder (expected "
                          f"{run_dir}/config.yaml and {run_dir}/model_config/config.json)")
    return run_dir


def export_checkpoint(checkpoint: str, hf_dir: str, *, overwrite: bool = False) -> Path:
    from safetensors import safe_open

    from lingshu_fast.data.tokenizer import load_tokenizer
    from lingshu_fast.model import load_hf_config
    from lingshu_fast.model.checkpoint_io import export_tensor_folder
    from lingshu_fast.model.export_folder import export_target_problem
    from lingshu_fast.train import checkpoint as ckpt

    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(f"{checkpoint} does not exist: give a run folder (run.dir), its checkpoints folder "
                          f"or one checkpoint (run.dir/checkpoints/step_000123)")
    problem = export_target_problem(hf_dir, overwrite=overwrite)
    if problem is not None:  # before anything is read
        raise ConfigError(problem)
    run_of = path.parent if path.name == "checkpoints" else path if (path / "checkpoints").is_dir() else None
    if run_of is not None:  # a run folder or its checkpoints folder: the newest checkpoint that verifies
        latest = ckpt.find_latest(run_of, checksums=True)
        if latest is None:
            raise ConfigError(f"no complete checkpoint under {path}")
        path = latest
    problem = ckpt.validate_checkpoint(path, checksums=True)
    if problem is not None:
        raise ConfigError(f"{path}: {problem}")
    saved = ckpt.load_checkpoint(path)
    run_dir = _run_dir_of(path)
    cfg = load_config(str(run_dir / "config.yaml"))
    weights = sorted((path / "model").glob("*.safetensors"))
    with safe_open(str(weights[0]), framework="pt") as f:
        dtype = f.get_slice(next(iter(f.keys()))).get_dtype()
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    export_tensor_folder(str(path / "model"), hf_dir, load_hf_config(str(run_dir / "model_config")), dtype,
                         overwrite=overwrite, extra_files=tokenizer.save_pretrained)
    print(f"lingshu-fast: exported {path} (step {saved['step']}) to {hf_dir}", flush=True)
    return Path(hf_dir)
