"""Batched autoregressive generation with a KV cache on our own Qwen2.5-VL (eval and RL rollouts).

`generate(model, prompts, max_new_tokens=..., stop_token_ids=...)` -> one `GenerationOutput` per
prompt (times `repeats`), in order.

Design choices:
- Images are encoded ONCE: every prompt's pixels go through the vision tower in one call (unless the
  prompt brings `image_embeds`), and `repeats=G` (GRPO's group) reuses that prompt's encoding, and
  its prefill, for all G samples: the prompt's K/V cache rows are copied G times, never recomputed.
- Prefill is one packed varlen forward over the distinct prompts (cu_seqlens, no padding), run
  through the decoder layers' own sub-modules so their K/V can be kept; `language.py` is untouched.
- Decode feeds one token per unfinished sequence and attends over its cache with SDPA and a padding
  mask ([B, heads, 1, L], GQA by `enable_gqa`). Caches are left-aligned per sequence; finished rows are
  compacted away once a quarter of the rows are done (a copy per compaction, not per step). The
  cache starts at the pass's longest prompt + 64 response slots and doubles when the responses
  outgrow it, so its size follows the actual lengths, not `max_new_tokens`.
- Memory: `memory_budget_bytes` (stage 4: `rl.rollout_memory_gb`) splits the prompts into passes
  whose worst case (every row at prompt + max_new_tokens, plus the sampling logits) fits it.
- One host sync per decode step: the finished-rows mask (stop, compact); tokens and log-probs are
  written into device buffers and read once at the end of the pass.
- M-RoPE while decoding: token i after the prompt sits at `max(prompt positions) + 1 + i` on all three
  axes, as transformers' `mrope_position_deltas` give.
- Tensor parallelism: each rank keeps the K/V of its own heads; the row-parallel o_proj/down_proj
  all-reduce; logits are gathered over TP; the sampled tokens and their log-probs are broadcast from
  the TP group's first rank, so every rank extends its cache with the very same token.
- Sequence parallelism is switched off for the duration of the call (it splits the token dimension,
  which a one-token decode step does not have).
- Pipeline parallelism (`parallel/relay.py`): the prefill and every decode step go through the
  stages one after the other by point-to-point send/recv; each stage keeps the K/V of its own
  layers, the first stage alone encodes the images and embeds, the last samples and broadcasts the
  tokens and log-probs over the pipeline group so every stage extends (and compacts) its caches
  alike. Every rank returns the same outputs. Interleaved chunks (`ModelChunks`) work the same way.
- `logprobs` are log_softmax(logits / T) of each chosen token (T = 1 for greedy): the behaviour
  policy's log-probs at temperature T, without the top-p renormalisation (as verl/TRL compute them).
- The stop token, when produced, is part of `token_ids` (the RL loss must learn to stop).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lingshu_fast.data.prompt import Prompt
from lingshu_fast.model.attention import varlen_attention
from lingshu_fast.model.ops import apply_rotary, swiglu
from lingshu_fast.model.sequence_parallel import without_sequence_parallel
from lingshu_fast.parallel.relay import broadcast_from_last_stage, last_stage_holder, model_chunks, relay


@dataclass
class GenerationOutput:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log_softmax(logits / T)[token] per token
    finished: bool = False  # stopped on a stop token (False: ran into max_new_tokens)


# ---------------------------------------------------------------------------- helpers


def _tp_group_info():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return None, 0
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()


def _encode_all_images(model, prompts: Sequence[Prompt], device) -> list[Optional[torch.Tensor]]:
    """Per prompt image embeddings; the prompts that bring pixels share ONE vision-tower call."""
    embeds: list[Optional[torch.Tensor]] = [None if p.image_embeds is None else p.image_embeds.to(device)
                                            for p in prompts]
    todo = [i for i, p in enumerate(prompts) if p.image_embeds is None and p.pixel_values is not None]
    if not todo:
        return embeds
    for i in todo:
        if prompts[i].image_grid_thw is None:
            raise ValueError(f"prompt {i}: pixel_values given without image_grid_thw")
    merge = model.config.vision_config.spatial_merge_size ** 2
    grids = [prompts[i].image_grid_thw.to(torch.long) for i in todo]
    pixels = torch.cat([prompts[i].pixel_values for i in todo]).to(device=device, dtype=model.dtype)
    encoded = model.encode_images(pixels, torch.cat(grids).to(device))
    counts = [int(g.prod(-1).sum()) // merge for g in grids]
    for i, part in zip(todo, encoded.split(counts)):
        embeds[i] = part
    return embeds


def _attn_prefill(layer, x, cos, sin, cu_seqlens, max_seqlen):
    """The decoder layer's forward (language.DecoderLayer), returning its rotated K and V too."""
    d = layer.head_dim
    qkv = layer.qkv(layer.input_layernorm(x))
    tokens = qkv.shape[0]
    q, k, v = qkv.split([layer.q_heads * d, layer.kv_heads * d, layer.kv_heads * d], dim=-1)
    q, k = apply_rotary(q.view(tokens, layer.q_heads, d), k.view(tokens, layer.kv_heads, d), cos, sin)
    v = v.reshape(tokens, layer.kv_heads, d)
    attn = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, backend=layer.attention_backend)
    x = x + layer.o_proj(attn.reshape(tokens, -1))
    return _mlp(layer, x), k, v


def _mlp(layer, x):
    gate, up = layer.gate_up(layer.post_attention_layernorm(x)).chunk(2, dim=-1)
    return x + layer.down_proj(swiglu(gate, up))


def _attn_decode(layer, x, cos, sin, k_cache, v_cache, write_at, key_mask):
    """One token per row: x [B, H]; caches [B, Hkv, L, D] updated in place at `write_at` [B]."""
    d = layer.head_dim
    rows = x.shape[0]
    qkv = layer.qkv(layer.input_layernorm(x))
    q, k, v = qkv.split([layer.q_heads * d, layer.kv_heads * d, layer.kv_heads * d], dim=-1)
    q, k = apply_rotary(q.view(rows, layer.q_heads, d), k.view(rows, layer.kv_heads, d), cos, sin)
    row_index = torch.arange(rows, device=x.device)
    k_cache[row_index, :, write_at] = k
    v_cache[row_index, :, write_at] = v.view(rows, layer.kv_heads, d)
    span = key_mask.shape[-1]  # only the filled prefix of the cache is read
    attn = F.scaled_dot_product_attention(
        q.unsqueeze(2), k_cache[:, :, :span], v_cache[:, :, :span], attn_mask=key_mask[:, None, None, :],
        enable_gqa=layer.q_heads != layer.kv_heads)  # [B, Hq, 1, D]
    x = x + layer.o_proj(attn.reshape(rows, -1))
    return _mlp(layer, x)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], log-probs [B]) from full-vocabulary logits [B, V]."""
    logits = logits.float()
    if temperature <= 0.0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already cover top_p (the first always stays)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------- generate


@torch.no_grad()
def generate(model, prompts: Sequence[Prompt], *, max_new_tokens: int, stop_token_ids: Sequence[int] = (),
             temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
             pad_token_id: Optional[int] = None, repeats: int = 1, memory_budget_bytes: Optional[int] = None,
             stats: Optional[dict] = None) -> list[GenerationOutput]:
    """Generate for every prompt `repeats` times (outputs ordered prompt-major: p0 x repeats, p1 ...).

    temperature 0 is greedy. `seed` seeds the sampling generator (same seed, same inputs, same
    layout and budget -> same samples); None draws from torch's global generator. `pad_token_id` is
    what finished rows are fed until they are compacted away (default: the first stop id, else 0).
    `memory_budget_bytes` bounds this rank's KV cache plus sampling logits of one pass: the prompts
    are generated in as many passes as the budget needs, each sized for its own prompts' worst case
    (a prompt's rows stay together). `stats`, when given, receives `passes`, `peak_cache_bytes`,
    `decode_steps` and `host_syncs`.
    Every rank of the model's TP x PP group must call this with the same prompts and arguments
    (collective: the stages relay each step, the last one broadcasts the sampled tokens).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    stats = stats if stats is not None else {}
    stats.update(passes=0, peak_cache_bytes=0, decode_steps=0, host_syncs=0)
    if not prompts:
        return []
    device = next(model.parameters()).device
    generator = None
    if seed is not None and temperature > 0.0:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    outputs: list[GenerationOutput] = []
    with without_sequence_parallel(model):
        prompts = [p.to(device, pixels=False) for p in prompts]  # ids and positions: the pixels move when encoded
        for chunk in _passes(model, prompts, repeats, max_new_tokens, memory_budget_bytes):
            stats["passes"] += 1
            outputs += _generate(model, chunk, max_new_tokens, list(stop_token_ids), temperature, top_p, generator,
                                 pad_token_id, repeats, stats)
    return outputs


def pass_bytes(model, prompt_lengths: Sequence[int], repeats: int, max_new_tokens: int) -> int:
    """Worst-case bytes of one pass on this rank: every row's K/V at prompt + max_new_tokens for this
    rank's layers, and the fp32 sampling buffers of the full-vocabulary logits (logits, log-softmax,
    probabilities: 3 copies)."""
    per_token = sum(2 * layer.kv_heads * layer.head_dim * model.dtype.itemsize
                    for chunk in model_chunks(model) for layer in chunk.layers)
    rows = len(prompt_lengths) * repeats
    vocab = model.config.text_config.vocab_size
    return sum(repeats * (n + max_new_tokens) * per_token for n in prompt_lengths) + rows * vocab * 4 * 3


def _passes(model, prompts: list, repeats: int, max_new_tokens: int, budget: Optional[int]) -> list[list]:
    """The prompts in order, cut into passes whose worst case fits `budget` (one pass without one)."""
    if budget is None:
        return [prompts]
    passes, current = [], []
    for i, prompt in enumerate(prompts):
        alone = pass_bytes(model, [len(prompt.input_ids)], repeats, max_new_tokens)
        if alone > budget:
            raise ValueError(f"prompt {i} ({len(prompt.input_ids)} tokens) x {repeats} samples of up to {max_new_tokens} "
                             f"new tokens needs {alone / 2**30:.2f} GiB of KV cache and logits, over the rollout budget "
                             f"of {budget / 2**30:.2f} GiB; raise rl.rollout_memory_gb or lower rl.num_generations / "
                             f"rl.max_new_tokens")
        lengths = [len(p.input_ids) for p in current + [prompt]]
        if current and pass_bytes(model, lengths, repeats, max_new_tokens) > budget:
            passes.append(current)
            current = []
        current.append(prompt)
    return passes + [current]


def _prefill(model, prompts, device, hidden_size: int):
    """One packed forward over the distinct prompts, stage by stage under pipeline parallelism.
    Returns (last-token logits [N, V] on the last stage's ranks, else None; per local chunk, its
    layers' K/V [T, Hkv, D]; prompt lengths)."""
    ids = torch.cat([p.input_ids for p in prompts]).to(device)
    lengths = [int(p.input_ids.shape[0]) for p in prompts]
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    positions = torch.cat([p.position_ids for p in prompts], dim=1).to(device)
    kv: dict[int, list] = {}

    def run_chunk(chunk, hidden):
        if chunk.pre_process:  # the vision tower and the embeddings live on the first stage only
            embeds = [e for e in _encode_all_images(chunk, prompts, device) if e is not None]
            hidden = chunk.embed(ids, image_embeds=torch.cat(embeds) if embeds else None)
        cos, sin = chunk.rope(positions)
        kv[id(chunk)] = []
        for layer in chunk.layers:
            hidden, k, v = _attn_prefill(layer, hidden, cos, sin, cu, max(lengths))
            kv[id(chunk)].append((k, v))
        if chunk.post_process:
            return chunk.logits(chunk.head(hidden[cu[1:].long() - 1]))
        return hidden

    logits = relay(model, run_chunk, (int(cu[-1]), hidden_size), model.dtype)
    return logits, [kv[id(chunk)] for chunk in model_chunks(model)], lengths


RESPONSE_SLOTS = 64  # cache slots for the first response tokens; the cache doubles when they run out


def _row_caches(kv, lengths, repeats, capacity, device):
    """One cache row per (prompt, repeat): the prompt's K/V copied, left-aligned, [B, Hkv, L, D]."""
    starts = [0] + torch.tensor(lengths).cumsum(0).tolist()
    caches = []
    for k, v in kv:
        kc = k.new_zeros(len(lengths) * repeats, k.shape[1], capacity, k.shape[2])
        vc = torch.zeros_like(kc)
        for i, length in enumerate(lengths):
            rows = slice(i * repeats, (i + 1) * repeats)
            kc[rows, :, :length] = k[starts[i]:starts[i + 1]].transpose(0, 1)
            vc[rows, :, :length] = v[starts[i]:starts[i + 1]].transpose(0, 1)
        caches.append([kc, vc])
    return caches


def _map_caches(caches, fn):
    return [[[fn(kc), fn(vc)] for kc, vc in chunk_caches] for chunk_caches in caches]


def _cache_bytes(caches) -> int:
    return sum(t.numel() * t.element_size() for chunk_caches in caches for kv in chunk_caches for t in kv)


def _generate(model, prompts, max_new_tokens, stop_ids, temperature, top_p, generator, pad_token_id, repeats, stats):
    """One pass. Per decode step the host reads one [rows] mask (finished rows: to stop, to compact);
    the tokens and log-probs stay on the device until the end."""
    device = next(model.parameters()).device
    hidden_size = model.config.text_config.hidden_size
    samples_here = last_stage_holder(model)  # the LM head's stage samples; the others receive the tokens
    tp_group, tp_src = _tp_group_info()
    for i, p in enumerate(prompts):
        if p.input_ids.dim() != 1 or p.position_ids.shape != (3, p.input_ids.shape[0]):
            raise ValueError(f"prompt {i}: input_ids must be [T] and position_ids [3, T], got "
                             f"{list(p.input_ids.shape)} and {list(p.position_ids.shape)}")
    logits, kv, lengths = _prefill(model, prompts, device, hidden_size)

    n_rows = len(prompts) * repeats
    row_prompt_len = [n for n in lengths for _ in range(repeats)]  # host copy, per cache row
    prompt_len = torch.tensor(row_prompt_len, device=device)
    full = max(lengths) + max_new_tokens
    capacity = min(full, max(lengths) + RESPONSE_SLOTS)  # sized by the actual prompts; grows with the responses
    caches = [_row_caches(chunk_kv, lengths, repeats, capacity, device) for chunk_kv in kv]
    del kv
    next_pos = torch.tensor([int(p.position_ids.max()) + 1 for p in prompts], device=device).repeat_interleave(repeats)
    if samples_here:
        logits = logits.repeat_interleave(repeats, dim=0)

    out_tokens = torch.zeros(n_rows, max_new_tokens, dtype=torch.long, device=device)
    out_logps = torch.zeros(n_rows, max_new_tokens, dtype=torch.float32, device=device)
    n_out = torch.zeros(n_rows, dtype=torch.long, device=device)
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    row_seq = torch.arange(n_rows, device=device)  # cache row -> output index
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    fill = pad_token_id if pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    stats["peak_cache_bytes"] = max(stats["peak_cache_bytes"], _cache_bytes(caches))
    for step in range(max_new_tokens):
        if samples_here:
            tokens, logps = _sample(logits, temperature, top_p, generator)
            if tp_group is not None:  # every TP rank must extend its cache with the same token
                dist.broadcast(tokens, src=tp_src, group=tp_group)
                dist.broadcast(logps, src=tp_src, group=tp_group)
        else:
            tokens = torch.empty(row_seq.shape[0], dtype=torch.long, device=device)
            logps = torch.empty(row_seq.shape[0], dtype=torch.float32, device=device)
        broadcast_from_last_stage(tokens), broadcast_from_last_stage(logps)  # every stage's caches follow
        tokens = torch.where(done, torch.full_like(tokens, fill), tokens)
        out_tokens[row_seq, step], out_logps[row_seq, step] = tokens, logps
        n_out[row_seq] += (~done).long()
        if stop.numel():
            newly = ~done & torch.isin(tokens, stop)
            finished[row_seq] |= newly
            done = done | newly
        if step + 1 == max_new_tokens:
            break
        done_host = done.tolist()  # the step's one host sync
        stats["host_syncs"] += 1
        if all(done_host):
            break
        if sum(done_host) * 4 >= len(done_host):  # compact: drop finished rows from the cache
            keep_host = [r for r, d in enumerate(done_host) if not d]
            keep = torch.tensor(keep_host, device=device)
            caches = _map_caches(caches, lambda t: t[keep])
            row_seq, tokens, prompt_len, next_pos, done = (t[keep] for t in (row_seq, tokens, prompt_len, next_pos, done))
            row_prompt_len = [row_prompt_len[k] for k in keep_host]
        last_slot = max(row_prompt_len) + step  # where this step's token goes, for the longest prompt
        if last_slot >= capacity:  # the responses outgrew the cache: double it, up to the worst case
            capacity = min(full, 2 * capacity)
            caches = _map_caches(caches, lambda t: torch.nn.functional.pad(t, (0, 0, 0, capacity - t.shape[2])))
        stats["peak_cache_bytes"] = max(stats["peak_cache_bytes"], _cache_bytes(caches))
        stats["decode_steps"] += 1
        logits = _decode_step(model, caches, tokens, prompt_len + step, next_pos + step, hidden_size, last_slot + 1)
    counts, ids, logps_all, ended = (t.cpu() for t in (n_out, out_tokens, out_logps, finished))
    return [GenerationOutput(token_ids=ids[r, :counts[r]].tolist(), logprobs=logps_all[r, :counts[r]].tolist(),
                             finished=bool(ended[r])) for r in range(n_rows)]


def _decode_step(model, caches, tokens, write_at, positions, hidden_size: int, span: int):
    """Feed one token per row through every stage; the last stage's logits [B, V] (None elsewhere).
    `write_at` [B] is each row's cache slot for this token, `positions` [B] its M-RoPE position,
    `span` = max(write_at) + 1 (known on the host: no sync)."""
    key_mask = torch.arange(span, device=tokens.device)[None, :] <= write_at[:, None]
    slot = {id(chunk): i for i, chunk in enumerate(model_chunks(model))}

    def run_chunk(chunk, hidden):
        if chunk.pre_process:  # the bare embedding: a sampled <|image_pad|> id is just a token here
            hidden = chunk.embed_tokens(tokens.unsqueeze(1)).squeeze(1)
        cos, sin = chunk.rope(positions.unsqueeze(0).expand(3, -1))
        for layer, (kc, vc) in zip(chunk.layers, caches[slot[id(chunk)]]):
            hidden = _attn_decode(layer, hidden, cos, sin, kc, vc, write_at, key_mask)
        return chunk.logits(chunk.head(hidden)) if chunk.post_process else hidden

    return relay(model, run_chunk, (int(tokens.shape[0]), hidden_size), model.dtype)
