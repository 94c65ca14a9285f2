"""Our parameter names <-> Hugging Face tensor names, and how each is split over tensor parallelism.

Hugging Face names are the ones transformers 5.x writes with `save_pretrained` (and vLLM reads):
`visual.*`, `model.embed_tokens.weight`, `model.layers.{i}.*`, `model.norm.weight`, `lm_head.weight`.
Checkpoints in transformers' in-memory layout (`model.visual.*`, `model.language_model.*`) are
accepted on load (`canonical_name`).

A `ParamSpec` says how one of our parameters is assembled from HF tensors for TP rank r of tp:
- split=None: replicated, the whole tensor (reshaped to `local_shape`: the patch embed's Conv3d);
- split=0 (column): for each piece, rows [r*n/tp, (r+1)*n/tp) of that piece's n rows, concatenated.
  A piece is one HF tensor, or one of `parts` equal row blocks of it (the ViT's fused qkv). So a
  fused q/k/v holds [this rank's q heads; its kv heads; its v heads], gate/up [gate shard; up shard];
- split=1 (row): columns [r*n/tp, (r+1)*n/tp).
A vision tower that TP cannot divide is replicated (`whole=True`): its specs then act as TP=1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Piece:
    hf_name: str
    part: int = 0
    parts: int = 1


@dataclass
class ParamSpec:
    pieces: list[Piece]
    split: Optional[int]  # None replicated, 0 column (rows), 1 row (columns)
    hf_shape: tuple = field(default=())  # full shape of the (single) HF tensor for replicated reshapes
    whole: bool = False  # a replicated vision tower under TP: read/write as if tp were 1


def canonical_name(name: str) -> str:
    """transformers' in-memory names -> the names it saves (and we use)."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def hf_tensor_shapes(config) -> dict[str, tuple]:
    """Every tensor a complete HF Qwen2.5-VL checkpoint of `config` holds, with its full shape."""
    t, v = config.text_config, config.vision_config
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    d, vi = v.hidden_size, v.intermediate_size
    merged = d * v.spatial_merge_size ** 2
    shapes: dict[str, tuple] = {
        "visual.patch_embed.proj.weight": (d, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        "visual.merger.ln_q.weight": (d,),
        "visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (v.out_hidden_size, merged), "visual.merger.mlp.2.bias": (v.out_hidden_size,),
        "model.embed_tokens.weight": (t.vocab_size, t.hidden_size),
        "model.norm.weight": (t.hidden_size,),
    }
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        shapes.update({
            p + "norm1.weight": (d,), p + "norm2.weight": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "mlp.gate_proj.weight": (vi, d), p + "mlp.gate_proj.bias": (vi,),
            p + "mlp.up_proj.weight": (vi, d), p + "mlp.up_proj.bias": (vi,),
            p + "mlp.down_proj.weight": (d, vi), p + "mlp.down_proj.bias": (d,),
        })
    h, q, kv, inter = t.hidden_size, t.num_attention_heads * hd, t.num_key_value_heads * hd, t.intermediate_size
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_size, t.hidden_size)
    return shapes


def _col(*names: str) -> ParamSpec:
    return ParamSpec([Piece(n) for n in names], 0)


def _rep(name: str, shape: tuple = ()) -> ParamSpec:
    return ParamSpec([Piece(name)], None, shape)


def param_specs(model) -> dict[str, ParamSpec]:
    """ParamSpec for every parameter of `model` (a Qwen25VLModel, any pipeline layer range)."""
    specs: dict[str, ParamSpec] = {}
    if model.pre_process:
        vcfg = model.config.vision_config
        specs["visual.patch_embed.weight"] = _rep(
            "visual.patch_embed.proj.weight", hf_tensor_shapes(model.config)["visual.patch_embed.proj.weight"])
        for i in range(vcfg.depth):
            o, p = f"visual.blocks.{i}.", f"visual.blocks.{i}."
            specs[o + "norm1.weight"] = _rep(p + "norm1.weight")
            specs[o + "norm2.weight"] = _rep(p + "norm2.weight")
            for kind in ("weight", "bias"):
                specs[o + f"qkv.{kind}"] = ParamSpec([Piece(p + f"attn.qkv.{kind}", j, 3) for j in range(3)], 0)
                specs[o + f"gate_up.{kind}"] = _col(p + f"mlp.gate_proj.{kind}", p + f"mlp.up_proj.{kind}")
            specs[o + "proj.weight"] = ParamSpec([Piece(p + "attn.proj.weight")], 1)
            specs[o + "proj.bias"] = _rep(p + "attn.proj.bias")
            specs[o + "down.weight"] = ParamSpec([Piece(p + "mlp.down_proj.weight")], 1)
            specs[o + "down.bias"] = _rep(p + "mlp.down_proj.bias")
        specs["visual.merger.ln_q.weight"] = _rep("visual.merger.ln_q.weight")
        specs["visual.merger.fc1.weight"] = _col("visual.merger.mlp.0.weight")
        specs["visual.merger.fc1.bias"] = _col("visual.merger.mlp.0.bias")
        specs["visual.merger.fc2.weight"] = ParamSpec([Piece("visual.merger.mlp.2.weight")], 1)
        specs["visual.merger.fc2.bias"] = _rep("visual.merger.mlp.2.bias")
        specs["embed_tokens.weight"] = _col("model.embed_tokens.weight")
    for j, layer in enumerate(model.layers):
        o, p = f"layers.{j}.", f"model.layers.{layer.layer_id}."
        specs[o + "input_layernorm.weight"] = _rep(p + "input_layernorm.weight")
        specs[o + "post_attention_layernorm.weight"] = _rep(p + "post_attention_layernorm.weight")
        for kind in ("weight", "bias"):
            specs[o + f"qkv.{kind}"] = _col(*(p + f"self_attn.{x}_proj.{kind}" for x in "qkv"))
        specs[o + "o_proj.weight"] = ParamSpec([Piece(p + "self_attn.o_proj.weight")], 1)
        specs[o + "gate_up.weight"] = _col(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        specs[o + "down_proj.weight"] = ParamSpec([Piece(p + "mlp.down_proj.weight")], 1)
    if model.post_process:
        specs["norm.weight"] = _rep("model.norm.weight")
        if model.lm_head.weight is not None:
            # tied under PP: the last stage's own copy starts from the embedding
            specs["lm_head.weight"] = _col("model.embed_tokens.weight" if model.tied else "lm_head.weight")
    if model.pre_process and model.visual.tp == 1:
        for name, spec in specs.items():
            if name.startswith("visual."):
                spec.whole = True
    names = {n for n, _ in model.named_parameters()}
    if names != set(specs):
        raise RuntimeError(f"internal: spec/parameter mismatch {sorted(names ^ set(specs))}")
    return specs


def saved_specs(model) -> dict[str, ParamSpec]:
    """The specs of the parameters this stage writes (a PP copy of a tied head is not written)."""
    specs = param_specs(model)
    if model.tied and model.post_process and not model.pre_process:
        specs.pop("lm_head.weight", None)
    return specs

