"""The embedded tiny model: a deterministic random Qwen2.5-VL written as a Hugging Face folder.

`model.path: tiny` resolves to `ensure_tiny_model(folder, tokenizer, seed)`: transformers builds
`Qwen2_5_VLForConditionalGeneration` from `tiny_hf_config` (sized to the tiny tokenizer, with its
special-token ids) under a fixed seed and saves it with the tokenizer beside it. Every parallel
layout then loads the same weights through `from_pretrained`, which is what makes the loss curve
layout-independent. Only rank 0 writes (into a temp folder, renamed when complete); the others wait.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist


def _tiny_config(tokenizer):
    from lingshu_fast.data.tokenizer import special_token_ids
    from lingshu_fast.model.config import tiny_hf_config

    ids = special_token_ids(tokenizer)
    vocab = len(tokenizer)
    vocab_padded = (vocab + 63) // 64 * 64  # divisible by any TP degree up to 64
    return tiny_hf_config(
        vocab_size=vocab_padded,
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
        eos_token_id=ids["im_end_id"], pad_token_id=ids["pad_token_id"], bos_token_id=ids["endoftext_id"],
    )


def ensure_tiny_model(folder: str | os.PathLike, tokenizer, seed: int = 0) -> Path:
    folder = Path(folder)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not (folder / "config.json").exists():
        from transformers import Qwen2_5_VLForConditionalGeneration

        folder.parent.mkdir(parents=True, exist_ok=True)
        cfg = _tiny_config(tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.float32)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    if dist.is_initialized():
        dist.barrier()
    return folder
