"""What the planner plans for: the model's config and a representative micro-batch, from a recipe.

Model: `model.path`'s config.json when that folder has one (also `model.init_from`'s, which the run
starts from), else the shipped config of `model.architecture`; None when neither (e.g. the tiny demo
model): then there is nothing to plan.

Micro-batch (a stated assumption, not data): `data.max_tokens_per_microbatch` tokens when packing
(at most `data.max_length` per sample), one sample of `data.max_length` otherwise; under pipeline
parallelism always the static `data.max_tokens_per_microbatch`. A share of the tokens are image
tokens (`IMAGE_TOKEN_SHARE` by stage: caption stages are image-heavy), each 4 ViT patches, in
images of up to `IMAGE_TOKENS_PER_IMAGE` tokens (an 896 x 896 image). Samples are `data.max_length`
long (the attention FLOPs' upper bound).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lingshu_fast.config import Config

IMAGE_TOKEN_SHARE = {1: 0.75, 2: 0.75, 3: 0.5, 4: 0.25}
IMAGE_TOKENS_PER_IMAGE = 1024  # 64 x 64 patches, 2x2 merged


def model_config_of(cfg: Config):
    """The HF config the recipe trains (see the module doc), or None when the recipe does not say."""
    from lingshu_fast.model.config import architecture_config, load_hf_config

    for folder in (cfg.model.init_from, cfg.model.path):
        if folder and folder != "tiny" and (Path(folder) / "config.json").is_file():
            return load_hf_config(folder)
    if cfg.model.architecture:
        return architecture_config(cfg.model.architecture)
    return None


@dataclass(frozen=True)
class MicroBatch:
    tokens: int
    seq_lens: tuple[int, ...]
    image_grids: tuple[tuple[int, int, int], ...]  # (t, h, w) in patches

    @property
    def patches(self) -> int:
        return sum(t * h * w for t, h, w in self.image_grids)

    @property
    def grid_thw(self) -> Optional[torch.Tensor]:
        return torch.tensor(self.image_grids, dtype=torch.long) if self.image_grids else None


def tokens_per_microbatch(cfg: Config, pp: int) -> int:
    data = cfg.data
    if pp > 1:
        return data.max_tokens_per_microbatch
    return min(data.max_length, data.max_tokens_per_microbatch) if not data.pack else data.max_tokens_per_microbatch


def representative_microbatch(cfg: Config, pp: int, merge: int = 2, image_share: Optional[float] = None) -> MicroBatch:
    tokens = tokens_per_microbatch(cfg, pp)
    share = IMAGE_TOKEN_SHARE.get(cfg.train.stage, 0.5) if image_share is None else image_share
    sample = max(1, min(cfg.data.max_length, tokens))
    seq_lens = [sample] * (tokens // sample) + ([tokens % sample] if tokens % sample else [])
    image_tokens = int(tokens * share)
    grids = []
    while image_tokens > 0:
        n = min(image_tokens, IMAGE_TOKENS_PER_IMAGE)
        side = max(1, int(math.sqrt(n)))
        rows, cols = side, max(1, n // side)  # merged-token rows/cols; a ragged last image
        grids.append((1, rows * merge, cols * merge))
        image_tokens -= rows * cols
    return MicroBatch(tokens, tuple(seq_lens), tuple(grids))
