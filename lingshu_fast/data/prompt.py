"""One prompt, as generation, rollouts, RL packing and evaluation all take it (`Prompt`), and the one
place its M-RoPE positions are derived from its rendered ids and image grids (`make_prompt`).

The rollout and RL packing keep ids and positions as host numpy arrays (packing concatenates them);
`Prompt.to(device)` gives the torch tensors generation runs on. Pixels are torch tensors throughout.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
import torch

from lingshu_fast.data.rope import sample_position_ids
from lingshu_fast.kernels.vision_geometry import MERGE_SIZE, image_tokens


@dataclass
class Prompt:
    input_ids: Any  # [P] int64: numpy on the host, torch once `to(device)`
    position_ids: Any  # [3, P] int64 M-RoPE positions
    pixel_values: Optional[torch.Tensor] = None  # [patches, 1176]
    image_grid_thw: Optional[torch.Tensor] = None  # [n, 3] int64
    image_embeds: Optional[torch.Tensor] = None  # [image tokens, H]: already encoded (generation skips the ViT)

    @property
    def num_image_tokens(self) -> int:
        if self.image_grid_thw is None:
            return 0
        return sum(image_tokens(*row) for row in self.image_grid_thw.tolist())

    def to(self, device, *, pixels: bool = True) -> "Prompt":
        """Every array as a torch tensor on `device` (numpy ids and positions converted); with
        pixels=False the pixels and image embeddings stay where they are (moved when encoded)."""
        def move(x):
            if x is None:
                return None
            return (torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x).to(device)

        return replace(self, input_ids=move(self.input_ids), position_ids=move(self.position_ids),
                       image_grid_thw=move(self.image_grid_thw),
                       pixel_values=move(self.pixel_values) if pixels else self.pixel_values,
                       image_embeds=move(self.image_embeds) if pixels else self.image_embeds)


def make_prompt(ids: np.ndarray, pixel_values: Optional[torch.Tensor], grid_thw: Optional[torch.Tensor], *,
                image_token_id: int, vision_start_token_id: int) -> Prompt:
    """The prompt of rendered `ids` (int64) whose images have these pixels and patch grids."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    grid = None if grid_thw is None or len(grid_thw) == 0 else grid_thw.to(torch.int64)
    positions = sample_position_ids(ids, None if grid is None else grid.numpy(), image_token_id=image_token_id,
                                    vision_start_token_id=vision_start_token_id, spatial_merge_size=MERGE_SIZE)
    return Prompt(ids, np.ascontiguousarray(positions, dtype=np.int64), pixel_values, grid)
