"""Qwen2.5-VL for packed training on Megatron-Core tensor-parallel layers.

Forward contract (one packed micro-batch, no padding, no batch dimension):
    out = model(input_ids=[T], position_ids=[3, T], cu_seqlens=[B+1] int32,
                pixel_values=None | [P, 1176], image_grid_thw=None | [n, 3],
                image_embeds=None | [n_image_tokens, H], return_logits=False)
    out.hidden_states  [T, H]  final-normed (on the last pipeline stage)
    out.logits         [T, V]  only with return_logits=True, gathered over TP

Pipeline structure: a model is built for a contiguous layer range
[layer_start, layer_end). The first stage (layer_start == 0) owns `visual` and `embed_tokens`;
the last (layer_end == num_layers) owns `norm` and `lm_head`. Pieces are callable alone:
`embed(...)` -> [T, H], `rope(position_ids)` -> (cos, sin), `run_layers(h, cos, sin, cu, max)`,
`head(h)` -> normed. A middle stage's forward takes `hidden_states=` instead of `input_ids` and
returns its un-normed output in `out.hidden_states`.

Sequence parallelism (`sequence_parallel=True`, TP > 1; see sequence_parallel.py): between stages
and inside the decoder each TP rank holds T/tp tokens (T must be a multiple of tp); the last
stage's `out.hidden_states` is gathered back to the full [T, H].

Tied embeddings: `lm_head_weight` is then `embed_tokens.weight`. Under PP>1 the last stage holds
its own copy (`lm_head.weight`, loaded from the embedding); keeping the two copies' gradients in
sync is the pipeline's job (as Megatron's embedding group does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from lingshu_fast.model.config import check_tensor_parallel, megatron_layer_config, mrope_section, text_head_dim
from lingshu_fast.model.language import DecoderLayer, mrope_cos_sin, mrope_inv_freq
from lingshu_fast.model.parallel_linear import ColumnLinear, VocabEmbedding
from lingshu_fast.model.recompute import layer_policy, maybe_checkpoint, normalize_policy
from lingshu_fast.model.sequence_parallel import gather_seq_output, scatter_seq
from lingshu_fast.model.vision import RMSNorm, VisionTower

GROUPS = ("vision", "merger", "llm")


@dataclass
class ModelOutput:
    hidden_states: torch.Tensor
    logits: Optional[torch.Tensor] = None


class Qwen25VLModel(nn.Module):
    def __init__(self, hf_config, *, dtype: torch.dtype = torch.float32, tp: Optional[int] = None,
                 layer_start: int = 0, layer_end: Optional[int] = None,
                 activation_checkpointing: Union[str, bool] = "none", checkpoint_every_k_layers: int = 1,
                 attention_backend: str = "auto", sequence_parallel: bool = False):
        super().__init__()
        from megatron.core import parallel_state as ps

        group_tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
        tp = group_tp if tp is None else tp
        vision_tp = check_tensor_parallel(hf_config, tp)
        if tp != group_tp:
            raise ValueError(f"model built for tp={tp} but Megatron's tensor-parallel group has {group_tp} ranks; "
                             "call lingshu_fast.parallel.state.init_parallel(tp, pp) first")
        tcfg, vcfg = hf_config.text_config, hf_config.vision_config
        for name, act in (("text_config", tcfg.hidden_act), ("vision_config", vcfg.hidden_act)):
            if act != "silu":
                raise ValueError(f"{name}.hidden_act={act!r}: only 'silu' (as in Qwen2.5-VL) is implemented")
        n_layers = tcfg.num_hidden_layers
        layer_end = n_layers if layer_end is None else layer_end
        if not 0 <= layer_start < layer_end <= n_layers:
            raise ValueError(f"layer range [{layer_start}, {layer_end}) is not inside [0, {n_layers})")
        self.config, self.tp, self.dtype = hf_config, tp, dtype
        self.layer_start, self.layer_end = layer_start, layer_end
        self.pre_process, self.post_process = layer_start == 0, layer_end == n_layers
        self.tied = bool(hf_config.tie_word_embeddings)
        mcfg = megatron_layer_config(dtype, tp)
        if self.pre_process:
            self.visual = VisionTower(vcfg, vision_tp, mcfg, dtype)
            self.embed_tokens = VocabEmbedding(tcfg.vocab_size, tcfg.hidden_size, config=mcfg)
        self.layers = nn.ModuleList(
            [DecoderLayer(tcfg, tp, mcfg, dtype, i) for i in range(layer_start, layer_end)])
        if self.post_process:
            self.norm = RMSNorm(tcfg.hidden_size, tcfg.rms_norm_eps, dtype)
            # tied on a single stage: no weight of its own, it borrows embed_tokens.weight
            borrow = self.tied and self.pre_process
            self.lm_head = ColumnLinear(tcfg.hidden_size, tcfg.vocab_size, bias=False, config=mcfg, skip_weight=borrow)
        theta = (tcfg.rope_parameters or {}).get("rope_theta", 1000000.0)
        self.register_buffer("rope_inv_freq", mrope_inv_freq(text_head_dim(hf_config), theta), persistent=False)
        self.mrope_section = mrope_section(hf_config)
        self.set_attention_backend(attention_backend)
        self.set_recompute(activation_checkpointing, checkpoint_every_k_layers)
        self.sequence_parallel = bool(sequence_parallel) and tp > 1  # a no-op at TP=1
        if self.sequence_parallel:
            self._enable_sequence_parallel()

    def _enable_sequence_parallel(self) -> None:
        """Decoder layers and the final norm work on T/tp tokens per rank (the ViT does not)."""
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
        norms = [self.norm] if self.post_process else []
        for layer in self.layers:
            layer.qkv.sequence_parallel = layer.gate_up.sequence_parallel = True
            layer.o_proj.sequence_parallel = layer.down_proj.sequence_parallel = True
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
        for norm in norms:
            norm.sync_group = group

    # ---- switches ----
    @property
    def activation_checkpointing(self) -> str:
        """The recompute policy: none | full | selective (recompute.py)."""
        return self._recompute_policy

    @activation_checkpointing.setter
    def activation_checkpointing(self, policy: Union[str, bool]) -> None:
        self.set_recompute(policy, getattr(self, "checkpoint_every_k_layers", 1))

    def set_recompute(self, policy: Union[str, bool], every_k: int = 1) -> None:
        """Activation checkpointing `policy` (True/False: full/none) on every `every_k`-th decoder layer
        (by global index) and ViT block."""
        policy = normalize_policy(policy)
        layer_policy(policy, 0, every_k)  # validates every_k
        self._recompute_policy, self.checkpoint_every_k_layers = policy, every_k
        chosen = {layer.layer_id: layer_policy(policy, layer.layer_id, every_k) for layer in self.layers}
        self._full_layers = {i for i, p in chosen.items() if p == "full"}
        for layer in self.layers:
            layer.selective = chosen[layer.layer_id] == "selective"
        if self.pre_process:
            self.visual.set_recompute(policy, every_k)

    def set_attention_backend(self, backend: str) -> None:
        for module in self.modules():
            if hasattr(module, "attention_backend"):
                module.attention_backend = backend

    # ---- vocabulary-parallel head, for the fused loss ----
    @property
    def lm_head_weight(self) -> torch.Tensor:
        """This rank's vocabulary shard [V/tp, H] of the output layer (the embedding's when tied)."""
        if not self.post_process:
            raise AttributeError("lm_head_weight exists only on the last pipeline stage")
        return self.lm_head.weight if self.lm_head.weight is not None else self.embed_tokens.weight

    @property
    def lm_head_is_embedding(self) -> bool:
        """True when `lm_head_weight` IS this stage's embedding weight (tied, one stage), whose gradient
        then also arrives through the embedding's backward."""
        return self.lm_head.weight is None

    @property
    def vocab_start_end(self) -> tuple[int, int]:
        """[start, end) of the global vocabulary ids held by this TP rank's lm_head_weight."""
        from megatron.core import parallel_state as ps

        per_rank = self.config.text_config.vocab_size // self.tp
        rank = ps.get_tensor_model_parallel_rank()
        return rank * per_rank, (rank + 1) * per_rank

    # ---- pieces ----
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """The vision tower alone: [P, 1176] -> [n_merged_tokens, H], images in order."""
        return self.visual(pixel_values, image_grid_thw)

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None, image_embeds=None) -> torch.Tensor:
        """Token embeddings [T, H] with image embeddings scattered into the `<|image_pad|>` positions."""
        hidden = self.embed_tokens(input_ids.unsqueeze(1)).squeeze(1)
        if image_embeds is None and pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            image_embeds = self.encode_images(pixel_values, image_grid_thw)
        image_mask = input_ids == self.config.image_token_id
        n_slots = int(image_mask.sum())
        if image_embeds is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image tokens but no pixel_values/image_embeds were given")
            return hidden
        if image_embeds.shape[0] != n_slots:
            raise ValueError(
                f"input_ids hold {n_slots} image tokens (id {self.config.image_token_id}) but the images give "
                f"{image_embeds.shape[0]} embeddings; each image needs t*h*w/4 pad tokens")
        hidden = hidden.clone()
        hidden[image_mask] = image_embeds.to(hidden.dtype)
        return hidden

    def _tp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group()

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mrope_cos_sin(position_ids, self.rope_inv_freq, self.mrope_section, self.dtype)

    def run_layers(self, hidden, cos, sin, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        for layer in self.layers:
            hidden = maybe_checkpoint(layer, hidden, cos, sin, cu_seqlens, max_seqlen,
                                      active=layer.layer_id in self._full_layers)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm; under sequence parallelism also gathers the T/tp slices back to [T, H]."""
        hidden = self.norm(hidden)
        return gather_seq_output(hidden, self._tp_group()) if self.sequence_parallel else hidden

    def logits(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [T, V], gathered over TP (evaluation only: training never needs them)."""
        return self.lm_head(normed_hidden, weight=self.lm_head_weight, gather_output=True)

    def forward(self, input_ids=None, position_ids=None, cu_seqlens=None, pixel_values=None, image_grid_thw=None,
                image_embeds=None, hidden_states=None, return_logits: bool = False, max_seqlen: Optional[int] = None):
        if position_ids is None or cu_seqlens is None:
            raise ValueError("position_ids [3, T] and cu_seqlens [B+1] are required (packed batches only)")
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first stage needs input_ids")
            hidden = self.embed(input_ids, pixel_values, image_grid_thw, image_embeds)
            if self.sequence_parallel:
                if hidden.shape[0] % self.tp:
                    raise ValueError(f"sequence parallelism needs the packed length ({hidden.shape[0]}) to be a "
                                     f"multiple of parallel.tp={self.tp}; pad the micro-batch")
                hidden = scatter_seq(hidden, self._tp_group())
        else:
            if hidden_states is None:
                raise ValueError("a middle/last pipeline stage needs hidden_states from the previous stage")
            hidden = hidden_states
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cos, sin = self.rope(position_ids)
        hidden = self.run_layers(hidden, cos, sin, cu_seqlens, max_seqlen)
        if not self.post_process:
            return ModelOutput(hidden_states=hidden)
        hidden = self.head(hidden)
        return ModelOutput(hidden_states=hidden, logits=self.logits(hidden) if return_logits else None)


# ---- module groups: freezing and per-group learning rates ----
def _group_of(name: str) -> str:
    name = re.sub(r"^chunks\.\d+\.", "", name)  # a `ModelChunks` prefixes each chunk's names
    if name.startswith("visual.merger."):
        return "merger"
    if name.startswith("visual."):
        return "vision"
    return "llm"


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters by group: `vision` (patch embed + blocks), `merger`, `llm` (embeddings, layers, norm, head)."""
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in GROUPS}
    for name, param in model.named_parameters():
        groups[_group_of(name)].append(param)
    return groups


def set_trainable(model: nn.Module, groups_frozen: list[str]) -> None:
    """requires_grad=False for every parameter of the listed groups, True for the others."""
    unknown = sorted(set(groups_frozen) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown module group(s) {unknown} to freeze; choose from {list(GROUPS)}")
    for name, param in model.named_parameters():
        param.requires_grad_(_group_of(name) not in groups_frozen)
