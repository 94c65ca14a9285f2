"""Model configuration: the transformers `Qwen2_5_VLConfig` is the single source of truth.

We do not mirror the HF config in our own dataclass: every module reads `config.text_config` /
`config.vision_config` directly, so a checkpoint's config.json round-trips unchanged through
`save_pretrained`. This file adds what the HF config lacks: a tiny config for tests and the demo,
reading config.json, the tensor-parallel divisibility checks, and Megatron-Core's layer config.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from lingshu_fast.config import ConfigError  # a ValueError: the CLI prints it as one line
from lingshu_fast.kernels.vision_geometry import geometry_mismatch

_TOP_LEVEL_KEYS = (
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings",
)
_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "rope_parameters",
)


def tiny_hf_config(**overrides: Any):
    """A tiny random-weight-sized Qwen2.5-VL config (runs on CPU in milliseconds).

    Overrides: the top-level ids (`image_token_id`, `video_token_id`, `vision_start_token_id`,
    `vision_end_token_id`), `tie_word_embeddings`, the text keys (`vocab_size`, `hidden_size`,
    `num_hidden_layers`, `eos_token_id`, `pad_token_id`, `bos_token_id`, ...), or whole dicts
    `text_config={...}` / `vision_config={...}` merged over the defaults. Unknown keys raise ValueError.
    """
    from transformers import Qwen2_5_VLConfig

    text = dict(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        # head_dim 16 -> 8 rotary frequencies split over (t, h, w)
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
    )
    vision = dict(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
        temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1, 3],
    )
    top = dict(image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003,
               tie_word_embeddings=False)
    text.update(overrides.pop("text_config", {}) or {})
    vision.update(overrides.pop("vision_config", {}) or {})
    for key, value in overrides.items():
        if key in _TOP_LEVEL_KEYS:
            top[key] = value
        elif key in _TEXT_KEYS:
            text[key] = value
        else:
            raise ValueError(
                f"tiny_hf_config: unknown override {key!r}; use one of {_TOP_LEVEL_KEYS + _TEXT_KEYS} "
                f"or text_config={{...}} / vision_config={{...}}"
            )
    too_big = {k: top[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
               if top[k] >= text["vocab_size"]}
    if too_big:
        raise ValueError(f"tiny_hf_config: special ids {too_big} must be < vocab_size={text['vocab_size']}")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top)


def load_hf_config(path: str):
    """Read `path/config.json` into a `Qwen2_5_VLConfig`, with a clear error when it is not one."""
    from transformers import Qwen2_5_VLConfig

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found: expected a Hugging Face Qwen2.5-VL folder")
    with open(config_file) as f:
        raw = json.load(f)
    if raw.get("model_type") != "qwen2_5_vl":
        raise ValueError(
            f"{config_file}: model_type is {raw.get('model_type')!r}; lingshu_fast loads only 'qwen2_5_vl' "
            "(Lingshu-7B/32B, Qwen2.5-VL-*-Instruct)"
        )
    config = Qwen2_5_VLConfig.from_pretrained(path)
    mismatch = geometry_mismatch(config.vision_config)
    if mismatch:
        raise ConfigError(f"{config_file}: {mismatch}")
    return config


ARCHITECTURES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "architectures")


def architecture_names() -> list[str]:
    """The Qwen2.5-VL sizes whose config.json ships with the package (architectures/README.md)."""
    return sorted(name[:-5] for name in os.listdir(ARCHITECTURES_DIR) if name.endswith(".json"))


def architecture_config(name: str):
    """The shipped `Qwen2_5_VLConfig` of `name` (e.g. "qwen2.5-vl-7b"): no weights needed."""
    from transformers import Qwen2_5_VLConfig

    path = os.path.join(ARCHITECTURES_DIR, f"{name}.json")
    if not os.path.isfile(path):
        raise ValueError(f"unknown architecture {name!r}; the package ships {', '.join(architecture_names())}")
    with open(path) as f:
        return Qwen2_5_VLConfig(**json.load(f))


def text_head_dim(config) -> int:
    text = config.text_config
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def mrope_section(config) -> list[int]:
    rope = config.text_config.rope_parameters or {}
    section = list(rope.get("mrope_section", [16, 24, 24]))
    if sum(section) * 2 != text_head_dim(config):
        raise ValueError(
            f"mrope_section {section} sums to {sum(section)}, but it must be head_dim/2 = {text_head_dim(config) // 2}"
        )
    return section


def check_tensor_parallel(config, tp: int) -> int:
    """Validate TP=`tp` for `config`; return the vision tower's TP size (tp, or 1 = replicated).

    Text dimensions that tp cannot split raise ValueError naming each of them. Vocabulary:
    Megatron's VocabParallelEmbedding needs vocab_size % tp == 0 (Qwen's 151936/152064 divide by 8);
    we do not pad. KV heads must divide by tp (no KV replication when tp > num_key_value_heads).
    The vision tower (with its merger) is small: when tp does not divide its dimensions (e.g.
    Qwen2.5-VL's MLP width 3420 at TP=8) it is replicated on every TP rank instead of sharded.
    """
    text, vision = config.text_config, config.vision_config
    text_checks = {
        "text_config.vocab_size": text.vocab_size,
        "text_config.num_attention_heads": text.num_attention_heads,
        "text_config.num_key_value_heads": text.num_key_value_heads,
        "text_config.intermediate_size": text.intermediate_size,
    }
    bad = [f"{name}={value}" for name, value in text_checks.items() if value % tp != 0]
    if bad:
        raise ConfigError(f"parallel.tp={tp} does not divide: {', '.join(bad)}; choose a parallel.tp that divides them")
    vision_dims = (vision.num_heads, vision.intermediate_size, vision.hidden_size * vision.spatial_merge_size ** 2)
    return tp if all(d % tp == 0 for d in vision_dims) else 1


def megatron_layer_config(dtype: torch.dtype, tp: int):
    """Megatron-Core's ModelParallelConfig for our TP layers.

    CPU allocation without initialisation: every weight is then filled from a checkpoint or from
    our own layout-independent random init (checkpoint_io), and moved to the target device.
    """
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp, use_cpu_initialization=True, perform_initialization=False,
        params_dtype=dtype, sequence_parallel=False,
    )
