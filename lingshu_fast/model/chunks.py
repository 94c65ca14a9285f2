"""`ModelChunks`: a rank's virtual pipeline stages under the interleaved schedule.

The layers are split into pp*V stages; rank r holds the V chunks s = c*pp + r (c = 0..V-1), each
its own `Qwen25VLModel`, gathered here so the loop, the checkpoints and the export treat them as the
rank's model. Stage 0 (chunk 0 of rank 0) holds the ViT and embeddings, stage pp*V-1 (chunk V-1 of
the last rank) the norm and LM head, so Megatron's embedding group (first and last PP rank) still
pairs the two copies of a tied embedding.

state_dict / parameters are nn.ModuleList's (`chunks.<c>.<name>`); `param_groups` and
`set_trainable` read through the prefix.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ModelChunks(nn.Module):
    def __init__(self, chunks: list):
        super().__init__()
        self.chunks = nn.ModuleList(chunks)
        first = chunks[0]
        self.config, self.dtype, self.tp, self.tied = first.config, first.dtype, first.tp, first.tied
        self.sequence_parallel = first.sequence_parallel

    @property
    def pre_process(self) -> bool:
        return self.chunks[0].pre_process

    @property
    def post_process(self) -> bool:
        return self.chunks[-1].post_process

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.chunks[-1].lm_head_weight

    @property
    def lm_head_is_embedding(self) -> bool:
        return self.chunks[-1].lm_head_is_embedding

    def forward(self, *args, **kwargs):
        raise RuntimeError("ModelChunks runs only through the pipeline runner (its chunks are pipeline stages)")


def rank_model(chunks: list) -> nn.Module:
    """The rank's model: the one chunk itself, or several in a `ModelChunks`."""
    return chunks[0] if len(chunks) == 1 else ModelChunks(chunks)

