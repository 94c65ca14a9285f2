"""The GRPO step: rollout sequences -> packed varlen micro-batches -> clipped policy loss + k3 KL.

Packing (`pack_sequences`): each sequence is its prompt's ids followed by its response ids (the
`<|im_end|>` that ended it included, so the policy learns to stop). Labels follow `MicroBatch`'s
convention: already shifted, `labels[i]` = token i+1 for every position whose next token is a
response token, -100 elsewhere (prompt, the last position). `loss_mask = labels != -100`,
`seq_index` is the sequence's id in the rollout, `advantages` its GRPO advantage on every token.
Response positions continue the prompt's M-RoPE ids as text: max(prompt ids) + 1, + 2, ... on all
three axes (what transformers' get_rope_index gives for text after the last image).

Image sharing: a micro-batch holds each of its prompts' images once; `forward_hidden` encodes them
with ONE `encode_images` call and repeats the embeddings for every sequence of the group, so the
vision tower runs once per prompt and micro-batch (its gradient is the sum over the group, as if
each sequence had run it).

Loss normalisation (independent of the DP layout and of how sequences fall into micro-batches):
the step's loss is `loss_agg` over ALL sequences of the update on all data-parallel ranks. A
micro-batch's `fused_linear_grpo_loss` is its local `loss_agg` mean; `grpo_closures` multiplies it
by its count, masked tokens (token-mean) or sequences with masked tokens (seq-mean-*), and the step
engine divides the summed gradients by the global count, reduced with the step's other scalars.
Sequences never straddle micro-batches, so the per-sequence means are exact, the sum over
micro-batches and ranks is the global mean, and the DP reduction of gradients is a plain sum (as in
stages 1-3).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from lingshu_fast.data.batch import IGNORE_INDEX, MicroBatch
from lingshu_fast.data.prompt import Prompt
from lingshu_fast.kernels import fused_linear_grpo_loss, token_logprobs
from lingshu_fast.parallel.relay import relay


@dataclass
class RLMicroBatch:
    mb: MicroBatch  # input_ids, shifted labels, position_ids, cu_seqlens (pixel_values unused)
    loss_mask: torch.Tensor  # [T] bool
    seq_index: torch.Tensor  # [T] int64, the sequence's id in the rollout
    advantages: torch.Tensor  # [T] float32
    prompt_pixel_values: Optional[torch.Tensor]  # each distinct prompt's images once, in prompt order
    prompt_grid_thw: Optional[torch.Tensor]
    prompt_image_tokens: list[int]  # LLM image tokens of each distinct prompt
    seq_prompt: list[int]  # for each sequence, its prompt's position among the distinct prompts
    old_logprobs: Optional[torch.Tensor] = None  # [T] fp32, set before the first update of a rollout
    ref_logprobs: Optional[torch.Tensor] = None  # [T] fp32, from the frozen reference model

    @property
    def num_masked(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def num_seqs(self) -> int:
        """Sequences with at least one trained token (what the seq-mean aggregations count)."""
        return int(torch.unique(self.seq_index[self.loss_mask]).numel())

    def to(self, device) -> "RLMicroBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RLMicroBatch(self.mb.to(device), move(self.loss_mask), move(self.seq_index), move(self.advantages),
                            move(self.prompt_pixel_values), move(self.prompt_grid_thw), self.prompt_image_tokens,
                            self.seq_prompt, move(self.old_logprobs), move(self.ref_logprobs))


def _one_sequence(prompt: Prompt, response: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids [L], shifted labels [L], position_ids [3, L]) of prompt + response."""
    response = np.asarray(response, dtype=np.int64)
    ids = np.concatenate([prompt.input_ids.astype(np.int64), response])
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    p = len(prompt.input_ids)
    labels[p - 1:len(ids) - 1] = response  # hidden state at i predicts token i+1
    start = int(prompt.position_ids.max()) + 1 if p else 0
    tail = np.broadcast_to(np.arange(start, start + len(response), dtype=np.int64), (3, len(response)))
    return ids, labels, np.concatenate([prompt.position_ids.astype(np.int64), tail], axis=1)


def _build(prompts: Sequence[Prompt], items: list[tuple[int, int, Sequence[int], float]], token_multiple: int,
           pad_token_id: int) -> RLMicroBatch:
    """items: (sequence id, prompt id, response ids, advantage) in packing order."""
    ids, labels, positions, seq_index, advantages, lengths = [], [], [], [], [], []
    distinct: dict[int, int] = {}
    seq_prompt = []
    for seq_id, prompt_id, response, advantage in items:
        x, y, pos = _one_sequence(prompts[prompt_id], response)
        ids.append(x), labels.append(y), positions.append(pos), lengths.append(len(x))
        seq_index.append(np.full(len(x), seq_id, dtype=np.int64))
        advantages.append(np.full(len(x), advantage, dtype=np.float32))
        seq_prompt.append(distinct.setdefault(prompt_id, len(distinct)))
    pad = -sum(lengths) % token_multiple
    if pad:  # sequence parallelism splits tokens over TP ranks: a pad segment with nothing trained
        ids.append(np.full(pad, pad_token_id, dtype=np.int64)), labels.append(np.full(pad, IGNORE_INDEX))
        positions.append(np.broadcast_to(np.arange(pad, dtype=np.int64), (3, pad))), lengths.append(pad)
        seq_index.append(np.full(pad, -1, dtype=np.int64)), advantages.append(np.zeros(pad, dtype=np.float32))
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    labels_t = torch.from_numpy(np.concatenate(labels))
    mb = MicroBatch(input_ids=torch.from_numpy(np.concatenate(ids)), labels=labels_t,
                    position_ids=torch.from_numpy(np.ascontiguousarray(np.concatenate(positions, axis=1))),
                    cu_seqlens=torch.from_numpy(cu), max_seqlen=int(max(lengths)),
                    num_label_tokens=int((labels_t != IGNORE_INDEX).sum()), num_samples=len(items))
    with_images = [prompts[p] for p in distinct if prompts[p].pixel_values is not None]
    pixel_values = torch.cat([p.pixel_values for p in with_images]) if with_images else None
    grids = torch.cat([p.image_grid_thw for p in with_images]) if with_images else None
    return RLMicroBatch(mb=mb, loss_mask=labels_t != IGNORE_INDEX,
                        seq_index=torch.from_numpy(np.concatenate(seq_index)),
                        advantages=torch.from_numpy(np.concatenate(advantages)), prompt_pixel_values=pixel_values,
                        prompt_grid_thw=grids, prompt_image_tokens=[prompts[p].num_image_tokens for p in distinct],
                        seq_prompt=seq_prompt)


def pack_sequences(prompts: Sequence[Prompt], seq_prompt_ids: Sequence[int], responses: Sequence[Sequence[int]],
                   advantages: Sequence[float], seq_ids: Sequence[int], max_tokens: int, *, token_multiple: int = 1,
                   pad_token_id: int = 0) -> list[RLMicroBatch]:
    """Greedy in-order packing of the sequences `seq_ids` into micro-batches of at most `max_tokens`
    tokens (a longer sequence gets a micro-batch of its own). Groups stay contiguous, so a group's
    images are usually encoded once for the whole group. `token_multiple` (TP size under sequence
    parallelism) pads each micro-batch with an untrained segment (seq_index -1) to a multiple."""
    out, current, used = [], [], 0
    for s in seq_ids:
        length = len(prompts[seq_prompt_ids[s]].input_ids) + len(responses[s])
        if current and used + length > max_tokens:
            out.append(_build(prompts, current, token_multiple, pad_token_id))
            current, used = [], 0
        current.append((int(s), int(seq_prompt_ids[s]), responses[s], float(advantages[s])))
        used += length
    if current:
        out.append(_build(prompts, current, token_multiple, pad_token_id))
    return out


def _shared_image_embeds(model: torch.nn.Module, rmb: RLMicroBatch) -> Optional[torch.Tensor]:
    """The micro-batch's image embeddings in token order, each distinct prompt's images encoded once."""
    if rmb.prompt_pixel_values is None:
        return None
    encoded = model.encode_images(rmb.prompt_pixel_values, rmb.prompt_grid_thw)
    per_prompt = encoded.split([n for n in rmb.prompt_image_tokens if n > 0])
    slot = {}  # distinct-prompt position -> its chunk in per_prompt
    for k, n in enumerate(rmb.prompt_image_tokens):
        if n > 0:
            slot[k] = len(slot)
    return torch.cat([per_prompt[slot[p]] for p in rmb.seq_prompt if p in slot])


def forward_hidden(model: torch.nn.Module, rmb: RLMicroBatch, hidden_in: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model's output hidden states: final-normed [T, H] for a whole model or a last pipeline
    stage, the layers' output for an earlier stage. The first stage embeds (each distinct prompt's
    images through the ViT once); a later one continues from `hidden_in`, the previous stage's."""
    mb = rmb.mb
    if model.pre_process:
        out = model(input_ids=mb.input_ids, position_ids=mb.position_ids, cu_seqlens=mb.cu_seqlens,
                    image_embeds=_shared_image_embeds(model, rmb), max_seqlen=mb.max_seqlen)
    else:
        out = model(hidden_states=hidden_in, position_ids=mb.position_ids, cu_seqlens=mb.cu_seqlens,
                    max_seqlen=mb.max_seqlen)
    return out.hidden_states


def _tp(tp_group):
    return tp_group if tp_group is not None and dist.is_initialized() and dist.get_world_size(tp_group) > 1 else None


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, rmb: RLMicroBatch, *, temperature: float,
                      tp_group=None) -> Optional[torch.Tensor]:
    """log pi(label | prefix) per token [T] fp32 (0 where not trained), without logits: old-policy
    log-probs (the policy before a rollout's first update) and the reference model's.

    Under pipeline parallelism `model` is this rank's chunk(s): the pass runs stage by stage
    (`relay`), and the log-probs come back on the rank holding the last stage only (None on the
    others), the one place the loss reads them."""
    labels = torch.where(rmb.loss_mask, rmb.mb.labels, torch.full_like(rmb.mb.labels, IGNORE_INDEX))

    def run_chunk(chunk, hidden_in):
        hidden = forward_hidden(chunk, rmb, hidden_in)
        if not chunk.post_process:
            return hidden
        return token_logprobs(hidden, chunk.lm_head_weight, labels, temperature=temperature, tp_group=_tp(tp_group))

    split = model.tp if getattr(model, "sequence_parallel", False) else 1  # stages pass T/tp tokens each
    shape = (rmb.mb.num_tokens // split, model.config.text_config.hidden_size)
    return relay(model, run_chunk, shape, model.dtype)


def norm_count(rmb: RLMicroBatch, loss_agg: str) -> int:
    """This micro-batch's share of the global denominator (see the module docstring)."""
    return rmb.num_masked if loss_agg == "token-mean" else rmb.num_seqs


def grpo_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, rmb: RLMicroBatch, rl_cfg, tp_group=None,
              head_grad: Optional[dict] = None):
    """(this micro-batch's `loss_agg` mean, stats) from the final hidden states: `fused_linear_grpo_loss`
    (`head_grad`: the runner's `head_grad_fusion()`)."""
    return fused_linear_grpo_loss(
        hidden, lm_head_weight, rmb.mb.labels, rmb.advantages, rmb.loss_mask, rmb.seq_index,
        old_logprobs=rmb.old_logprobs, ref_logprobs=rmb.ref_logprobs, beta=rl_cfg.beta,
        clip_low=rl_cfg.clip_low, clip_high=rl_cfg.clip_high, temperature=rl_cfg.temperature,
        loss_agg=rl_cfg.loss_agg, tp_group=_tp(tp_group), **(head_grad or {}))


STAT_KEYS = ("kl", "clip_frac", "masked_tokens")  # summed per update: kl and clip_frac times masked tokens


def _pad_tail(t: Optional[torch.Tensor], n: int, value) -> Optional[torch.Tensor]:
    return None if t is None else torch.cat([t, t.new_full((n,), value)])


def pad_rl_microbatch(rmb: RLMicroBatch, runner, pad_token_id: int = 0) -> RLMicroBatch:
    """`rmb` at the shape the runner runs (`runner.pad`); the padding trains nothing (loss_mask False,
    seq_index -1, advantage 0, log-probs 0)."""
    mb = runner.pad(rmb.mb, pad_token_id)
    extra = mb.num_tokens - rmb.mb.num_tokens
    if extra == 0:
        return rmb
    return dataclasses.replace(
        rmb, mb=mb, loss_mask=_pad_tail(rmb.loss_mask, extra, False), seq_index=_pad_tail(rmb.seq_index, extra, -1),
        advantages=_pad_tail(rmb.advantages, extra, 0.0), old_logprobs=_pad_tail(rmb.old_logprobs, extra, 0.0),
        ref_logprobs=_pad_tail(rmb.ref_logprobs, extra, 0.0))


def empty_rl_microbatch() -> RLMicroBatch:
    """A micro-batch of nothing: fills an update up to a count the pipeline schedule runs (padded to its
    static shape by `pad_rl_microbatch`, all of it untrained)."""
    nothing = torch.zeros(0, dtype=torch.int64)
    mb = MicroBatch(input_ids=nothing, labels=nothing.clone(), position_ids=torch.zeros(3, 0, dtype=torch.int64),
                    cu_seqlens=torch.zeros(1, dtype=torch.int32), max_seqlen=0)
    return RLMicroBatch(mb=mb, loss_mask=torch.zeros(0, dtype=torch.bool), seq_index=nothing.clone(),
                        advantages=torch.zeros(0), prompt_pixel_values=None, prompt_grid_thw=None,
                        prompt_image_tokens=[], seq_prompt=[])


def grpo_closures(runner, rmbs: Sequence[RLMicroBatch], rl_cfg, pad_token_id: int = 0):
    """(the micro-batches as the runner runs them, first_forward, loss_of) of one GRPO update.

    A micro-batch's loss is its `loss_agg` mean times its count (`norm_count`): the SUM form the
    engine divides by the global count. `rmbs` carry old/ref log-probs on the rank holding the last
    stage (`sequence_logprobs`); elsewhere they may be None: only the last stage reads them. Under
    pipeline parallelism the update is filled up to a micro-batch count the schedule runs with
    empty micro-batches, whose loss is 0 * hidden so the stages still get their (zero) gradients."""
    rmbs = list(rmbs) + [empty_rl_microbatch() for _ in range(runner.count(len(rmbs)) - len(rmbs))]
    padded = [pad_rl_microbatch(rmb, runner, pad_token_id).to(runner.device) for rmb in rmbs]

    def first_forward(first, k: int) -> torch.Tensor:
        return forward_hidden(first, padded[k])

    def loss_of(hidden: torch.Tensor, k: int):
        rmb = padded[k]
        count = norm_count(rmb, rl_cfg.loss_agg)
        if count == 0:  # nothing trained (padding, or every response cut to nothing)
            return hidden.sum() * 0.0, {"kl": 0.0, "clip_frac": 0.0, "masked_tokens": 0.0}
        loss, stats = grpo_loss(hidden, runner.lm_head_weight, rmb, rl_cfg, runner.tp_group, runner.head_grad_fusion())
        n = rmb.num_masked
        return loss * count, {"kl": stats["kl"] * n, "clip_frac": stats["clip_frac"] * n, "masked_tokens": n}

    return [rmb.mb for rmb in padded], first_forward, loss_of
