"""Test helpers of stage 4: RL prompts as the rollout builds them (used by the tests' spawned processes)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from lingshu_fast.data.prompt import make_prompt
from lingshu_fast.kernels.vision_geometry import image_tokens


def rl_prompt_parts(hf_config, gen: torch.Generator, layout: Sequence) -> list:
    """RL prompts as the rollout builds them (`data.prompt.Prompt`), from `layout`: per prompt
    (image grid (t, h, w) or None, text tokens before the image, text tokens after it); random
    text ids and pixels from `gen`, M-RoPE positions from `data.rope`."""
    parts = []
    for grid, before, after in layout:
        tokens = torch.randint(3, 900, (before,), generator=gen).tolist()
        pixel_values = grid_thw = None
        if grid is not None:
            n_image = image_tokens(*grid)
            tokens += ([hf_config.vision_start_token_id] + [hf_config.image_token_id] * n_image
                       + [hf_config.vision_end_token_id])
            grid_thw = torch.tensor([grid])
            pixel_values = torch.randn(grid[0] * grid[1] * grid[2], 1176, generator=gen)
        tokens += torch.randint(3, 900, (after,), generator=gen).tolist()
        arr = np.asarray(tokens, dtype=np.int64)
        parts.append(make_prompt(arr, pixel_values, grid_thw, image_token_id=hf_config.image_token_id,
                                 vision_start_token_id=hf_config.vision_start_token_id))
    return parts
