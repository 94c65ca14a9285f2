"""3-D M-RoPE position ids for Qwen2.5-VL, per sample and for packed sequences.

Qwen2.5-VL gives every LLM token three rotary positions (temporal, height, width). Text tokens
carry the same 1-D position on all three axes. The `t*h*w / merge**2` placeholder tokens of an
image (its merged patches, in row-major (t, h, w) order) get `start + (t_idx, h_idx, w_idx)`, where
`start` is the position the next text token would have had; the text after the image resumes at
`start + max(h, w) / merge`. This equals transformers' `Qwen2_5_VLModel.get_rope_index` for images
(still images: no temporal scaling); video is not supported here and raises NotImplementedError.

Packed (varlen) training restarts positions at 0 in every sample, so a packed micro-batch's
position ids are the per-sample ids concatenated (`packed_position_ids`).

Two interchangeable implementations compute one sample: a vectorised numpy one (always there) and
the native `lingshu_fast._C.mrope_position_ids` (built by CMake when a compiler is present); both
validate the input the same way and are tested to give identical ids.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lingshu_fast.data.packing import load_native

__all__ = ["sample_position_ids", "packed_position_ids", "get_rope_index"]


def _image_token_counts(image_grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """Placeholder tokens per image (`t*h*w / merge**2`); validates the grids."""
    if image_grid_thw.ndim != 2 or image_grid_thw.shape[1] != 3:
        raise ValueError(f"image_grid_thw must have shape [n_images, 3], got {list(image_grid_thw.shape)}")
    if (image_grid_thw <= 0).any():
        raise ValueError("image_grid_thw entries must be positive")
    hw = image_grid_thw[:, 1:]
    if (hw % spatial_merge_size).any():
        raise ValueError(
            f"image_grid_thw heights/widths must be multiples of spatial_merge_size={spatial_merge_size}, "
            f"got {image_grid_thw.tolist()}"
        )
    return image_grid_thw[:, 0] * hw[:, 0] * hw[:, 1] // (spatial_merge_size**2)


def _image_starts(
    input_ids: np.ndarray, counts: np.ndarray, image_token_id: int, vision_start_token_id: int
) -> np.ndarray:
    """Token index where each image's placeholder run starts; raises ValueError on any mismatch."""
    image_positions = np.flatnonzero(input_ids == image_token_id)
    n_expected = int(counts.sum())
    if image_positions.size != n_expected:
        raise ValueError(
            f"the sample has {image_positions.size} image placeholder tokens (id {image_token_id}) but "
            f"image_grid_thw describes {counts.size} image(s) needing {n_expected} "
            f"(t*h*w/merge^2 per image: {counts.tolist()})"
        )
    first = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    starts = image_positions[first] if counts.size else np.zeros(0, np.int64)
    if counts.size:
        ends = image_positions[first + counts - 1]
        broken = np.flatnonzero(ends - starts != counts - 1)
        if broken.size:
            k = int(broken[0])
            raise ValueError(
                f"image {k}'s {int(counts[k])} placeholder tokens are not contiguous from token "
                f"{int(starts[k])}: the image tokens do not match image_grid_thw"
            )
        unwrapped = np.flatnonzero((starts == 0) | (input_ids[np.maximum(starts - 1, 0)] != vision_start_token_id))
        if unwrapped.size:
            k = int(unwrapped[0])
            raise ValueError(
                f"image {k}'s placeholder run at token {int(starts[k])} is not preceded by the "
                f"vision-start token (id {vision_start_token_id})"
            )
    return starts


def _sample_position_ids_numpy(
    input_ids: np.ndarray, image_grid_thw: np.ndarray, image_token_id: int, vision_start_token_id: int,
    spatial_merge_size: int,
) -> np.ndarray:
    n_tokens = input_ids.shape[0]
    counts = _image_token_counts(image_grid_thw, spatial_merge_size)
    starts = _image_starts(input_ids, counts, image_token_id, vision_start_token_id)
    merged_h = image_grid_thw[:, 1] // spatial_merge_size
    merged_w = image_grid_thw[:, 2] // spatial_merge_size
    # Each image advances the text position by max(h, w) instead of its token count.
    span = np.maximum(merged_h, merged_w)
    shift = np.zeros(n_tokens + 1, np.int64)
    np.add.at(shift, starts + counts, span - counts)
    text_pos = np.arange(n_tokens, dtype=np.int64) + np.cumsum(shift[:n_tokens])
    position_ids = np.repeat(text_pos[None, :], 3, axis=0)
    if counts.size:
        image_of_token = np.repeat(np.arange(counts.size), counts)
        first = np.concatenate(([0], np.cumsum(counts)[:-1]))
        local = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)  # index in its image
        w = merged_w[image_of_token]
        hw = merged_h[image_of_token] * w
        base = np.repeat(text_pos[starts], counts)
        token_index = np.flatnonzero(input_ids == image_token_id)
        position_ids[0, token_index] = base + local // hw
        position_ids[1, token_index] = base + (local // w) % merged_h[image_of_token]
        position_ids[2, token_index] = base + local % w
    return position_ids


def sample_position_ids(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    *,
    image_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int = 2,
    video_token_id: int | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """Position ids `int64 [3, T]` of ONE unpadded sample (positions start at 0).

    `image_grid_thw` is the sample's images' `(t, h, w)` patch grids in order (None or empty for a
    text-only sample). Raises ValueError when the image placeholders do not match the grids, and
    NotImplementedError when `video_token_id` is given and occurs. `backend`: "auto" (native when
    built), "numpy" or "native".
    """
    input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    if input_ids.ndim != 1:
        raise ValueError(f"input_ids must be 1-D (one unpadded sample), got shape {list(input_ids.shape)}")
    if spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size must be >= 1, got {spatial_merge_size}")
    if video_token_id is not None and (input_ids == video_token_id).any():
        raise NotImplementedError("video placeholders are not supported by lingshu_fast.data.rope")
    grid = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, dtype=np.int64)
    grid = np.ascontiguousarray(grid.reshape(-1, 3) if grid.size == 0 else grid)
    native = load_native(backend)
    if native is not None:
        return native.mrope_position_ids(input_ids, grid, image_token_id, vision_start_token_id, spatial_merge_size)
    return _sample_position_ids_numpy(input_ids, grid, image_token_id, vision_start_token_id, spatial_merge_size)


def packed_position_ids(per_sample: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate per-sample `[3, T_i]` ids into `[3, sum T_i]`; each sample keeps its own 0 start."""
    if len(per_sample) == 0:
        return np.zeros((3, 0), np.int64)
    return np.concatenate([np.asarray(p, dtype=np.int64).reshape(3, -1) for p in per_sample], axis=1)


def get_rope_index(
    input_ids,
    image_grid_thw=None,
    attention_mask=None,
    *,
    image_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int = 2,
    backend: str = "auto",
):
    """Batched torch API mirroring transformers' `Qwen2_5_VLModel.get_rope_index` (images only).

    `input_ids [B, T]`, `image_grid_thw [n_images, 3]` for the whole batch in order,
    `attention_mask [B, T]` (1 = real token; left or right padding). Returns
    `(position_ids [3, B, T], mrope_position_deltas [B, 1])` on `input_ids`' device; padded
    positions are 0, as in transformers, and the delta is `max position + 1 - real tokens`.
    """
    import torch

    ids_np = input_ids.detach().cpu().numpy().astype(np.int64, copy=False)
    batch, seq_len = ids_np.shape
    mask_np = None if attention_mask is None else attention_mask.detach().cpu().numpy().astype(bool)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else (
        image_grid_thw.detach().cpu().numpy().astype(np.int64).reshape(-1, 3)
    )
    counts = _image_token_counts(grids, spatial_merge_size) if grids.shape[0] else np.zeros(0, np.int64)
    position_ids = np.zeros((3, batch, seq_len), np.int64)
    deltas = np.zeros((batch, 1), np.int64)
    next_image = 0
    for b in range(batch):
        keep = np.ones(seq_len, bool) if mask_np is None else mask_np[b]
        sample = ids_np[b][keep]
        # This sample's images are the next ones in the batch's grid list, by placeholder count.
        n_tokens = int((sample == image_token_id).sum())
        cum = np.cumsum(counts[next_image:])
        n_images = int(np.searchsorted(cum, n_tokens, side="right")) if n_tokens else 0
        if n_tokens and (n_images == 0 or cum[n_images - 1] != n_tokens):
            raise ValueError(
                f"sample {b} has {n_tokens} image placeholder tokens, which does not match the next "
                f"image_grid_thw entries (cumulative token counts {cum[:4].tolist()}...)"
            )
        sample_grid = grids[next_image:next_image + n_images]
        next_image += n_images
        ids = sample_position_ids(
            sample, sample_grid, image_token_id=image_token_id, vision_start_token_id=vision_start_token_id,
            spatial_merge_size=spatial_merge_size, backend=backend,
        )
        position_ids[:, b, keep] = ids
        deltas[b, 0] = (int(ids.max()) + 1 if ids.size else 0) - sample.shape[0]
    if next_image != grids.shape[0]:
        raise ValueError(f"image_grid_thw has {grids.shape[0]} images but the batch uses only {next_image}")
    device = input_ids.device
    return (
        torch.from_numpy(position_ids).to(device=device, dtype=input_ids.dtype),
        torch.from_numpy(deltas).to(device),
    )
