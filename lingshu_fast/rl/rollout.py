"""RL prompts and rollouts: verifiable records -> prompts -> G sampled responses each -> rewards.

`PromptDataset` reads RL records through the data index (data/index.py, built once in "prompt"
mode): user turns plus the fields the verifiers read (`answer`, `task`, `options`, ...). A
trailing assistant turn, if a record has one, is dropped from the prompt (it is a reference answer,
not part of the question: formats.prompt_messages). Records without `answer` are skipped as
bad_schema; prompts longer than data.max_length - rl.max_new_tokens as too_long (each counted, or
one DataError under data.strict=true). A prompt's record is read, rendered and its images decoded
only when a rollout asks for it; the index gives every length at start-up.

A bad image found only when decoded (a truncated DICOM whose header read fine) does not end the
run: `usable_prompts` skips that prompt - logged, never tried again - and takes the next readable
prompt of the data set in its place. So every rank's rollout keeps its size (the DP collectives and
the loss normalisation see the same counts as without the bad file), and the choice is
deterministic: the ranks of a TP x PP group, which decode the same files, pick the same prompts
(the group's first rank's choice is used anyway). The unreadable prompts are shared over the
data-parallel group after each rollout, so each is counted once however many ranks met it
(`Rollout.skipped_samples`) and kept in the resume state.

Order and sharding: the prompt stream is the concatenation of per-epoch seeded permutations of the
data set. Rollout k takes global stream positions [k*R, (k+1)*R) (R = rl.rollout_batch) and DP rank
r the contiguous slice r*R/dp ... (r+1)*R/dp of it, so rollout k asks the same prompts whatever
the DP size. `state_dict()` is the global position: resuming (with any DP size dividing R) yields
the very next prompts. `epochs` (train.epochs) bounds the run through `available_updates`.

`collect_rollout` runs `generate(..., repeats=G)`: each prompt's images are encoded once and its
prefill shared by its G samples. The response keeps the `<|im_end|>` that ended it (the loss
trains stopping). A response that produces a vision placeholder (`<|image_pad|>`, `<|vision_start|>`
...) is cut before it: such a token cannot be embedded without an image, so training on it is
impossible; the cut response counts as unfinished. Text for the verifiers is the response decoded
without its stop token; `score_responses` gives rewards (a failing verifier scores 0, counted);
the ranks of a TP x PP group all take its first rank's scores (a verifier's time limit can fire on
one rank only).
With `backend=` (rl.backend=vllm, `rl.vllm_backend.VLLMClient`) the responses come from a vLLM
server instead (`chat_messages` / `chat_images` give it the record); the rest is the same.
"""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from lingshu_fast.config import ROLLOUT_CPU_GB, ROLLOUT_FREE_FRACTION
from lingshu_fast.data import images as img
from lingshu_fast.data.dataset import image_grids, open_parts, select_usable
from lingshu_fast.data.formats import DataError, SampleError, SkipLog
from lingshu_fast.data.prompt import Prompt, make_prompt
from lingshu_fast.data.template import ChatTemplate
from lingshu_fast.kernels.vision_geometry import PATCH_SIZE, image_tokens

logger = logging.getLogger(__name__)


class _View:
    """`dataset.samples[i]` / `.ids[i]`: prompt i's record or token ids, read from its data file when
    asked (the dataset holds only the index)."""

    def __init__(self, dataset: "PromptDataset", what: str):
        self._dataset, self._what = dataset, what

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int):
        return getattr(self._dataset, self._what)(int(index))


class PromptDataset:
    """RL prompts for one data-parallel rank; see the module docstring."""

    def __init__(self, sources: Sequence, tokenizer, data_cfg, *, max_new_tokens: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, epochs: Optional[int] = None):
        self.cfg, self.dp_rank, self.dp_size, self.seed, self.epochs = data_cfg, dp_rank, dp_size, int(seed), epochs
        self.template = ChatTemplate(tokenizer, data_cfg.system_prompt)
        self.token_ids = self.template.ids
        self.skips = SkipLog(strict=data_cfg.strict, max_logged=20)
        self.parts = open_parts(sources, self.template, data_cfg, mode="prompt")
        limit = data_cfg.max_length - max_new_tokens
        lengths, self._record_of, self._part_starts, empty = select_usable(
            self.parts, min_pixels=data_cfg.min_pixels, max_pixels=data_cfg.max_pixels, limit=limit,
            why=f"leaves no room for rl.max_new_tokens={max_new_tokens} under data.max_length={data_cfg.max_length}",
            skips=self.skips)
        self.skips.raise_if_strict()
        if empty:
            raise DataError(f"{empty[0]}; RL records need user turns and an 'answer' (data.strict=true lists each "
                            f"problem)")
        self.skips.log_summary(f"{len(lengths)} usable RL prompts")
        self._lengths = lengths
        self.samples, self.ids = _View(self, "sample"), _View(self, "prompt_ids")
        self.fingerprint = zlib.crc32(lengths.tobytes()) ^ len(lengths)
        self.position = 0  # global position in the prompt stream
        self.bad: set[int] = set()  # prompts whose images failed to decode in a rollout (any DP rank)
        self._perms: dict[int, np.ndarray] = {}

    def _locate(self, index: int):
        record = int(self._record_of[index])
        p = int(np.searchsorted(self._part_starts, record, side="right")) - 1
        return self.parts[p], record - int(self._part_starts[p])

    def sample(self, index: int):
        """Prompt `index`'s record: messages without the trailing reference answer, extra fields."""
        part, k = self._locate(index)
        try:
            return part.read_sample(k)
        except SampleError as err:
            raise DataError(f"{part.source(k)}: {err.reason.value}: {err} (the file changed after indexing?)") from None

    def grid(self, index: int) -> np.ndarray:
        part, k = self._locate(index)
        return image_grids(part, k, min_pixels=self.cfg.min_pixels, max_pixels=self.cfg.max_pixels)

    def prompt_ids(self, index: int) -> np.ndarray:
        """int64 token ids of prompt `index` (rendered now; its length is the index's)."""
        return self._render(index, self.sample(index), self.grid(index))

    def _render(self, index: int, sample, grid: np.ndarray) -> np.ndarray:
        ids = self.template.render_prompt(sample.messages, [image_tokens(t, h, w) for t, h, w in grid])
        if len(ids) != int(self._lengths[index]):
            raise DataError(f"{sample.source}: {len(ids)} tokens now, {int(self._lengths[index])} in the index: the "
                            f"data or tokenizer changed since indexing; delete the index to rebuild it")
        return ids.astype(np.int64)

    def available_updates(self, rollout_batch: int, updates_per_rollout: int) -> int:
        """Optimizer updates the prompts of `epochs` epochs give (whole rollouts only)."""
        if self.epochs is None:
            raise ValueError("an endless prompt stream (epochs=None) has no total")
        return self.epochs * len(self) // rollout_batch * updates_per_rollout

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def skipped(self) -> int:
        """Records dropped at start-up plus prompts found unreadable in rollouts, each once (after
        `collect_rollout` the same on every rank: report it, do not all-reduce it)."""
        return self.skips.total + len(self.bad)

    def usable_prompts(self, indices: Sequence[int]) -> list[tuple[int, Prompt]]:
        """(index, prompt) for each of `indices`; a prompt whose image fails to decode is skipped and the
        next readable prompt of the data set (in data-set order) stands in (see the module docstring)."""
        out = []
        for index in indices:
            for candidate in (int(index + k) % len(self) for k in range(len(self))):
                if candidate in self.bad:
                    continue
                try:
                    out.append((candidate, self._decode(candidate)))
                    break
                except img.ImageError as err:
                    source = self.sample(candidate).source
                    if self.cfg.strict:
                        raise DataError(f"{source}: corrupt_image: {err}") from err
                    self.bad.add(candidate)
                    logger.warning("skipping RL prompt %s: corrupt_image: %s (the next readable prompt "
                                   "takes its place)", source, err)
            else:
                raise DataError(f"no RL prompt has a readable image any more ({len(self.bad)} failed to decode, "
                                f"e.g. {self.sample(index).source})")
        return out

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            seed = np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.Generator(np.random.PCG64(seed)).permutation(len(self))
        return self._perms[epoch]

    def next_indices(self, global_count: int) -> list[int]:
        """This rank's slice of the next `global_count` prompts of the stream (dataset indices)."""
        if global_count % self.dp_size:
            raise ValueError(f"{global_count} prompts do not split over {self.dp_size} data-parallel ranks")
        per_rank = global_count // self.dp_size
        lo = self.position + self.dp_rank * per_rank
        n = len(self)
        out = [int(self._perm(p // n)[p % n]) for p in range(lo, lo + per_rank)]
        self.position += global_count
        return out

    def prompt(self, index: int) -> Prompt:
        """The prompt's ids, M-RoPE positions and preprocessed images (decoded here)."""
        try:
            return self._decode(index)
        except img.ImageError as err:
            raise DataError(f"{self.sample(index).source}: corrupt_image: {err}") from err

    def _decode(self, index: int) -> Prompt:
        sample, grid = self.sample(index), self.grid(index)  # the record is read once
        ids = self._render(index, sample, grid)
        pixel_values = grid_thw = None
        if sample.images:
            arrays = [img.load_image(p) for p in sample.images]
            pixel_values, grid_thw = img.preprocess(arrays, min_pixels=self.cfg.min_pixels,
                                                    max_pixels=self.cfg.max_pixels)
            if not np.array_equal(grid_thw.numpy(), grid):
                raise DataError(f"{sample.source}: image grids {grid_thw.tolist()} differ from the start-up scan "
                                f"{grid.tolist()}: an image changed on disk?")
            pixel_values, grid_thw = pixel_values.float(), grid_thw.to(torch.int64)
        return make_prompt(ids, pixel_values, grid_thw, image_token_id=self.token_ids["image_token_id"],
                           vision_start_token_id=self.token_ids["vision_start_token_id"])

    def chat_messages(self, index: int) -> list[dict]:
        """The prompt's messages (content strings with <image> markers) with the system turn our template
        renders, for a backend that applies the chat template itself (rl.backend=vllm)."""
        messages = [dict(m) for m in self.sample(index).messages]
        if not messages or messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.template.system_prompt})
        return messages

    def chat_images(self, index: int) -> list[np.ndarray]:
        """The prompt's images as uint8 RGB [H, W, 3], resized to the grid its ids were rendered with
        (sides already multiples of 28: a Qwen2.5-VL processor keeps them and gives the same tokens)."""
        import PIL.Image

        sample, out = self.sample(index), []
        for path, (_, h, w) in zip(sample.images, self.grid(index).tolist()):
            try:
                rgb = img.load_image(path)
            except img.ImageError as err:
                raise DataError(f"{sample.source}: corrupt_image: {err}") from err
            size = (w * PATCH_SIZE, h * PATCH_SIZE)
            if (rgb.shape[1], rgb.shape[0]) != size:
                rgb = np.asarray(PIL.Image.fromarray(rgb).resize(size, PIL.Image.BICUBIC))
            out.append(rgb)
        return out

    def verifier_sample(self, index: int) -> dict:
        """What the verifiers read: the record's extra fields (answer, task, options, ...)."""
        return dict(self.sample(index).extra)

    def state_dict(self) -> dict:
        return {"version": 1, "position": self.position, "seed": self.seed, "fingerprint": self.fingerprint,
                "num_samples": len(self), "bad": sorted(self.bad)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise DataError(f"unknown RL prompt-stream state version {state.get('version')!r}")
        if state["seed"] != self.seed or state["fingerprint"] != self.fingerprint:
            raise DataError(f"cannot resume the RL prompts: the checkpoint was made with seed={state['seed']} on "
                            f"{state['num_samples']} prompts, this run has seed={self.seed} on {len(self)} "
                            f"(different data, tokenizer or data.* settings)")
        self.position = int(state["position"])
        self.bad = {int(i) for i in state.get("bad", [])}


@dataclass
class Rollout:
    """One rank's rollout: B prompts x G responses, sequences group-major (seq s -> prompt s // G)."""
    prompts: list[Prompt]
    seq_prompt: np.ndarray  # [B*G] the prompt (group) of each sequence
    responses: list[list[int]]
    finished: np.ndarray  # [B*G] bool
    texts: list[str]
    rewards: np.ndarray  # [B*G] float32
    breakdown: dict[str, np.ndarray]
    failures: int
    generate_s: float
    skipped_samples: int = 0  # unusable records so far, each once, over all ranks (PromptDataset.skipped)

    @property
    def response_tokens(self) -> int:
        return sum(len(r) for r in self.responses)


def _cut_at_vision_tokens(token_ids: list[int], vision_ids: set[int]) -> tuple[list[int], bool]:
    for k, tok in enumerate(token_ids):
        if tok in vision_ids:
            return token_ids[:k], True
    return token_ids, False


def collect_rollout(model, dataset: PromptDataset, indices: Sequence[int], rl_cfg, tokenizer, *,
                    seed: Optional[int], backend=None) -> Rollout:
    """Sample rl.num_generations responses for each prompt of `indices` and score them.

    `backend`: None samples with our generator on `model`; otherwise an object with
    `generate_rollout(dataset, indices, rl_cfg, stop_token_ids=...) -> list[GenerationOutput]`
    (prompt-major, G per prompt), e.g. `rl.vllm_backend.VLLMClient` (it does not take `seed`)."""
    from lingshu_fast.rl.rewards import score_responses

    ids = dataset.token_ids
    usable = dataset.usable_prompts(indices)
    dataset.bad = _data_parallel_union(dataset.bad)
    indices = _model_parallel_first([i for i, _ in usable])
    prompts = [p for _, p in usable] if indices == [i for i, _ in usable] else [dataset.prompt(i) for i in indices]
    g = rl_cfg.num_generations
    start = time.perf_counter()
    if backend is None:
        outputs = _generate_native(model, prompts, rl_cfg, ids, seed)
    else:
        outputs = backend.generate_rollout(dataset, indices, rl_cfg, stop_token_ids=[ids["im_end_id"]])
        if len(outputs) != len(prompts) * g:
            raise RuntimeError(f"rollout backend returned {len(outputs)} responses for {len(prompts)} prompts x {g}")
    generate_s = time.perf_counter() - start
    vision_ids = {ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    responses, finished, texts = [], [], []
    for out in outputs:
        tokens, cut = _cut_at_vision_tokens(list(out.token_ids), vision_ids)
        done = out.finished and not cut
        responses.append(tokens)
        finished.append(done)
        body = tokens[:-1] if done and tokens and tokens[-1] == ids["im_end_id"] else tokens
        texts.append(tokenizer.decode(body, skip_special_tokens=False))
    samples = [dataset.verifier_sample(i) for i in indices for _ in range(g)]
    scored = score_responses(texts, samples, rl_cfg.rewards, timeout_s=rl_cfg.reward_timeout_s)
    rewards, breakdown, failures = _model_parallel_first(scored)
    return Rollout(prompts=prompts, seq_prompt=np.repeat(np.arange(len(prompts)), g), responses=responses,
                   finished=np.asarray(finished, dtype=bool), texts=texts, rewards=np.asarray(rewards, np.float32),
                   breakdown=breakdown, failures=int(failures), generate_s=generate_s,
                   skipped_samples=dataset.skipped)


def _model_parallel_first(value):
    """`value` of the first rank of this rank's TP x PP group, on every rank of the group. Each rank
    scores the (identical) responses itself, but a verifier call that hits its time limit on one
    rank only would give the ranks different rewards: different advantages and, with equal-group
    filtering, different micro-batches, i.e. mismatched TP collectives and pipeline schedules."""
    if not (dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()):
        return value
    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _data_parallel_union(bad: set[int]) -> set[int]:
    """The unreadable prompts any rank of this rank's data-parallel group has met."""
    if not dist.is_available() or not dist.is_initialized():
        return bad
    if not ps.model_parallel_is_initialized() or ps.get_data_parallel_world_size() == 1:
        return bad
    group = ps.get_data_parallel_group()
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, sorted(bad), group=group)
    return {int(i) for part in gathered for i in part}


def rollout_budget_bytes(rl_cfg, device: torch.device) -> int:
    """Bytes one generation pass may hold in KV cache and sampling logits on this rank:
    `rl.rollout_memory_gb`, else ROLLOUT_FREE_FRACTION of the GPU's free memory (the smallest over the
    TP x PP group: its ranks must cut the prompts into the same passes), else ROLLOUT_CPU_GB on CPU."""
    if rl_cfg.rollout_memory_gb is not None:
        return int(rl_cfg.rollout_memory_gb * 2**30)
    if device.type != "cuda":
        return int(ROLLOUT_CPU_GB * 2**30)
    free = torch.tensor([float(torch.cuda.mem_get_info(device)[0]) * ROLLOUT_FREE_FRACTION], device=device)
    if dist.is_initialized():
        dist.all_reduce(free, op=dist.ReduceOp.MIN, group=ps.get_model_parallel_group())
    return int(free.item())


def _generate_native(model, prompts: list[Prompt], rl_cfg, ids: dict, seed: Optional[int]) -> list:
    """Our generator's outputs, `repeats=G` (each prompt's images encoded once for its group),
    synchronised so that the caller's clock counts the queued kernels."""
    from lingshu_fast.model.generate import generate

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = generate(model, prompts, max_new_tokens=rl_cfg.max_new_tokens, temperature=rl_cfg.temperature,
                       top_p=rl_cfg.top_p, stop_token_ids=[ids["im_end_id"]], seed=seed,
                       pad_token_id=ids["pad_token_id"], repeats=rl_cfg.num_generations,
                       memory_budget_bytes=rollout_budget_bytes(rl_cfg, device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.train(was_training)
    return outputs
