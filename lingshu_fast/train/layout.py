"""How a run is laid out over processes: the parallel groups, and which layers each pipeline rank holds.

Pipeline layout. Stage s holds decoder layers [start_s, end_s); the first stage also holds the
vision tower and the embeddings, the last the final norm and the LM head. `stage_layer_ranges`
balances the stages by the model's FLOP estimate (`lingshu_fast.model.flops.pipeline_layer_split`),
in which the first stage pays for the ViT on a representative image load and the last for the LM
head. Interleaved 1F1B (`parallel.pp_schedule=interleaved`, `parallel.virtual_stages=V`): the
layers are split into pp*V stages and rank r holds the V chunks s = c*pp + r (`model.chunks`).
"""
from __future__ import annotations

from megatron.core import parallel_state as ps

from lingshu_fast.config import Config, ConfigError
from lingshu_fast.model.flops import pipeline_layer_split
from lingshu_fast.parallel.relay import model_chunks
from lingshu_fast.parallel.state import LayoutError, ParallelDims, init_parallel


def start_parallel(cfg: Config) -> ParallelDims:
    """torch.distributed and Megatron-Core's groups for `cfg.parallel` (a layout the world cannot
    hold is a one-line ConfigError)."""
    try:
        return init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.backend)
    except LayoutError as err:
        raise ConfigError(str(err)) from None


def check_schedule(parallel) -> int:
    """The number of chunks per rank (`parallel.virtual_stages`), checked against the schedule."""
    v, schedule = parallel.virtual_stages, parallel.pp_schedule
    if v < 1:
        raise ConfigError(f"parallel.virtual_stages={v} must be >= 1")
    if schedule == "interleaved" and v < 2:
        raise ConfigError("parallel.pp_schedule=interleaved needs parallel.virtual_stages >= 2 (chunks per rank)")
    if schedule != "interleaved" and v > 1:
        raise ConfigError(f"parallel.virtual_stages={v} needs parallel.pp_schedule=interleaved "
                          f"({schedule} runs one stage per rank)")
    return v


def stage_layer_ranges(hf_config, pp: int, pp_rank: int, tokens_per_microbatch: int,
                       virtual_stages: int = 1) -> list[tuple[int, int]]:
    """Decoder layers [start, end) of each chunk of pipeline rank `pp_rank` (chunk c is stage
    c*pp + pp_rank of pp*virtual_stages), for micro-batches of `tokens_per_microbatch` tokens of
    which a quarter are image tokens (4 ViT patches each): a typical multimodal mix."""
    stages, layers = pp * virtual_stages, hf_config.text_config.num_hidden_layers
    if stages > layers:
        raise ConfigError(f"parallel.pp={pp} x parallel.virtual_stages={virtual_stages} = {stages} pipeline stages "
                          f"but the model has {layers} decoder layers (one at least per stage)")
    split = pipeline_layer_split(hf_config, stages, seq_len=tokens_per_microbatch,
                                 image_patches=tokens_per_microbatch)
    return [split[chunk * pp + pp_rank] for chunk in range(virtual_stages)]


def rank_layer_kwargs(hf_config, dims: ParallelDims, cfg: Config) -> list[dict]:
    """`layer_start`/`layer_end` keyword sets of this rank's model chunks ([{}]: the whole model)."""
    if dims.pp == 1:
        return [{}]
    ranges = stage_layer_ranges(hf_config, dims.pp, dims.pp_rank, cfg.data.max_tokens_per_microbatch,
                                check_schedule(cfg.parallel))
    return [{"layer_start": start, "layer_end": end} for start, end in ranges]


def mark_tied_copies(model, dims: ParallelDims) -> None:
    """Tied embeddings under PP: the last stage keeps its own copy of the embedding as LM head. Both
    copies get `tied_group` (Megatron-Core's embedding group: the first and last stage) so the grad
    buffers sum their gradients over it before the DP reduction and both take the same update; the
    last stage's copy is marked `shared` so the gradient norm counts it once. Call before the
    optimizer (its buffers place tied parameters apart)."""
    if dims.pp == 1 or not model.config.tie_word_embeddings or not ps.is_rank_in_embedding_group():
        return
    chunks = model_chunks(model)
    group = ps.get_embedding_group()
    if chunks[0].pre_process:
        chunks[0].embed_tokens.weight.tied_group = group
    if chunks[-1].post_process and not chunks[-1].pre_process:
        chunks[-1].lm_head.weight.shared = True
        chunks[-1].lm_head.weight.tied_group = group
