"""Qwen2-VL / Qwen2.5-VL vision geometry: the one home of the patch, merge and temporal sizes.

An image is smart-resized to sides that are multiples of FACTOR = PATCH_SIZE * MERGE_SIZE (28), cut
into PATCH_SIZE x PATCH_SIZE patches (its grid (t, h, w) = (1, H/14, W/14); a still image repeats
to fill TEMPORAL_PATCH_SIZE frames), and the ViT's merger turns each MERGE_SIZE x MERGE_SIZE block
of patches into one LLM token: t*h*w / MERGE_SIZE**2 `<|image_pad|>` tokens per image.

Every Qwen2.5-VL size (3B, 7B, 32B, 72B) uses these numbers; the data pipeline and the image-pack
kernel are built for them, and `geometry_mismatch` compares them with a checkpoint's
`vision_config` so a model with other sizes is refused with one line instead of mis-tokenised.
Bottom layer: imports nothing from the package.
"""
from __future__ import annotations

from typing import Any, Optional

PATCH_SIZE = 14  # pixels per patch side (vision_config.patch_size)
MERGE_SIZE = 2  # patches per merged-token side (vision_config.spatial_merge_size)
TEMPORAL_PATCH_SIZE = 2  # frames per patch (vision_config.temporal_patch_size)
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: resized image sides are multiples of this
MERGE_UNIT = MERGE_SIZE * MERGE_SIZE  # patches per LLM image token


def image_tokens(t: int, h: int, w: int) -> int:
    """LLM `<|image_pad|>` tokens of an image whose patch grid is (t, h, w)."""
    return int(t) * int(h) * int(w) // MERGE_UNIT


def geometry_mismatch(vision_config: Any) -> Optional[str]:
    """None when a model's vision config has this geometry, else what differs (for an error)."""
    want = {"patch_size": PATCH_SIZE, "spatial_merge_size": MERGE_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE}
    got = {key: getattr(vision_config, key, value) for key, value in want.items()}
    if got == want:
        return None
    diff = ", ".join(f"{key}={got[key]} (supported: {want[key]})" for key in want if got[key] != want[key])
    return f"the model's vision_config has {diff}; lingshu_fast's data pipeline and image kernels are built for " \
           f"Qwen2.5-VL's {PATCH_SIZE}-pixel patches merged {MERGE_SIZE}x{MERGE_SIZE}"
