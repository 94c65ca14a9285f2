"""Qwen2.5-VL (Lingshu) on Megatron-Core tensor-parallel layers, with HF checkpoints in and out.

Public API:
    from_pretrained(path, *, dtype, device, activation_checkpointing, checkpoint_every_k_layers, layer_start,
                    layer_end, attention_backend)   activation_checkpointing: none | full | selective
    build_model(hf_config, *, seed, dtype, device, ...)      random init, identical under any TP/PP layout
    save_pretrained(model, path, *, max_shard_bytes)           HF folder transformers/vLLM load unchanged
    full_hf_state_dict(model, *, grads=False)                  this stage's tensors/grads, HF names, TP-gathered
    Qwen25VLModel, ModelOutput                                 the model and its forward's result
    set_trainable(model, groups_frozen), param_groups(model)   module groups: vision, merger, llm
    tiny_hf_config(**overrides), load_hf_config(path)
    training_flops(config, seq_lens, image_grid_thw), forward_flops(...), pipeline_layer_split(config, pp, ...)
    CheckpointError
"""
from lingshu_fast.model.checkpoint_io import (
    CheckpointError,
    build_model,
    from_pretrained,
    full_hf_state_dict,
    save_pretrained,
)
from lingshu_fast.model.config import load_hf_config, tiny_hf_config
from lingshu_fast.model.flops import forward_flops, pipeline_layer_split, training_flops
from lingshu_fast.model.qwen2_5_vl import GROUPS, ModelOutput, Qwen25VLModel, param_groups, set_trainable

__all__ = [
    "CheckpointError", "GROUPS", "ModelOutput", "Qwen25VLModel", "build_model", "forward_flops", "from_pretrained", "full_hf_state_dict",
    "load_hf_config", "param_groups", "pipeline_layer_split", "save_pretrained", "set_trainable", "tiny_hf_config", "training_flops",
]
