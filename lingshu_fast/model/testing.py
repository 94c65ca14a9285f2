"""Test helpers: packed multimodal batches and transformers' per-sample reference.

Kept in the package (not in a test file) so that spawned test processes and other parts' tests
(e.g. the trainer's layout-independence test) can build the very same batch.
"""
from __future__ import annotations

from typing import Sequence

import torch

# (image grids (t, h, w) in patches, number of trailing text tokens) per sample: two images of
# different sizes (the first spans several 112-px windows with ragged edges), one image, text only
DEFAULT_LAYOUT = (
    ([(1, 12, 20), (1, 4, 6)], 7),
    ([(1, 10, 4)], 3),
    ([], 9),
)


def rope_index(hf_config, input_ids: torch.Tensor, grids: torch.Tensor | None) -> torch.Tensor:
    """3-D position ids [3, T] of one sample from transformers' own get_rope_index."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    if grids is None:
        return torch.arange(input_ids.shape[0]).unsqueeze(0).expand(3, -1).contiguous()
    holder = Qwen2_5_VLModel.__new__(Qwen2_5_VLModel)  # get_rope_index only reads .config
    holder.__dict__["config"] = hf_config
    token_type = (input_ids == hf_config.image_token_id).int().unsqueeze(0)
    pos, _ = Qwen2_5_VLModel.get_rope_index(holder, input_ids.unsqueeze(0), token_type, image_grid_thw=grids)
    return pos[:, 0]


def packed_batch(hf_config, layout: Sequence = DEFAULT_LAYOUT, seed: int = 0) -> dict:
    """A packed batch for our forward plus `samples`: the per-sample inputs for transformers."""
    gen = torch.Generator().manual_seed(seed)
    merge_unit = hf_config.vision_config.spatial_merge_size ** 2
    patch_values = 3 * hf_config.vision_config.temporal_patch_size * hf_config.vision_config.patch_size ** 2
    vocab_text_max = min(hf_config.image_token_id, hf_config.vision_start_token_id) - 1
    samples = []
    for grids, n_text in layout:
        ids: list[int] = []
        for t, h, w in grids:
            prompt = torch.randint(5, vocab_text_max, (2,), generator=gen).tolist()
            ids += prompt + [hf_config.vision_start_token_id] + [hf_config.image_token_id] * (t * h * w // merge_unit)
            ids += [hf_config.vision_end_token_id]
        ids += torch.randint(5, vocab_text_max, (n_text,), generator=gen).tolist()
        input_ids = torch.tensor(ids)
        grid = torch.tensor(grids, dtype=torch.long) if grids else None
        n_patches = sum(t * h * w for t, h, w in grids)
        pixels = torch.randn(n_patches, patch_values, generator=gen) if grids else None
        samples.append(dict(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grid,
                            position_ids=rope_index(hf_config, input_ids, grid)))
    lengths = [s["input_ids"].shape[0] for s in samples]
    with_images = [s for s in samples if s["image_grid_thw"] is not None]
    return dict(
        input_ids=torch.cat([s["input_ids"] for s in samples]),
        position_ids=torch.cat([s["position_ids"] for s in samples], dim=1),
        cu_seqlens=torch.tensor([0] + lengths).cumsum(0).to(torch.int32),
        pixel_values=torch.cat([s["pixel_values"] for s in with_images]) if with_images else None,
        image_grid_thw=torch.cat([s["image_grid_thw"] for s in with_images]) if with_images else None,
        samples=samples,
    )


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "samples"}


@torch.no_grad()
def hf_logits_per_sample(hf_model, batch: dict) -> list[torch.Tensor]:
    """transformers' logits [T_i, V] for each sample, run alone and unpadded."""
    out = []
    for s in batch["samples"]:
        logits = hf_model(input_ids=s["input_ids"].unsqueeze(0), pixel_values=s["pixel_values"],
                          image_grid_thw=s["image_grid_thw"], position_ids=s["position_ids"].unsqueeze(1)).logits
        out.append(logits[0])
    return out


def save_tiny_tied_model(folder, *, num_hidden_layers: int = 4, seed: int = 0):
    """The tiny model on the tiny tokenizer's special ids, with `num_hidden_layers` decoder layers
    (pp=2 x 2 interleaved chunks needs 4) and tied embeddings (so a pipeline run also exercises the
    embedding-group sync between the first chunk and the last), written to `folder` with the
    tokenizer beside it. Returns `folder`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lingshu_fast.data.tokenizer import load_tokenizer, special_token_ids
    from lingshu_fast.model.config import tiny_hf_config

    tokenizer = load_tokenizer("tiny")
    ids = special_token_ids(tokenizer)
    config = tiny_hf_config(
        vocab_size=(len(tokenizer) + 63) // 64 * 64, num_hidden_layers=num_hidden_layers, tie_word_embeddings=True,
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
        eos_token_id=ids["im_end_id"], pad_token_id=ids["pad_token_id"], bos_token_id=ids["endoftext_id"])
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
