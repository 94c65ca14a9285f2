"""End-to-end training step: tokens/s/GPU and MFU with the real trainer pieces.

What one timed "step" is: the trainer's `StepEngine.step` (lingshu_fast.train.engine: zero_grad, the
runner's forward, fused LM-head loss and backward over EVERY micro-batch of a small synthetic data
set, the step's one reduction, gradient scaling and clipping, `optimizer.step` with AdamW from
`build_optimizer`, fp32 masters in bf16).
Micro-batches come from `PackedLoader` (the trainer's loader) over a synthetic JSONL written at
start-up: text lengths lognormal (many short QA turns, a long tail), a share of samples with one
PNG image of random size. They are built and moved to the device before timing, as the trainer's
prefetching overlaps data with compute.

Rows (each with `tokens_per_s_per_gpu`, `mfu` and the figures below in `extra_info`):
- stage1: the vision tower + merger train, the LLM is frozen (`set_trainable(model, ["llm"])`);
  caption-like samples, every one with an image; packed.
- stage3[packed] / stage3[padded]: all weights train, the same samples, the same model.
- stage3_packing_gain: both layouts timed interleaved in one test (machine load hits both alike);
  `packing_gain` = packed tokens/s / padded tokens/s.
- rl: one GRPO update through the same engine with `lingshu_fast.rl.step`'s closures.

The padded baseline, precisely: the samples in the order `data.pack=false` yields them (a seeded
permutation), grouped greedily into micro-batches while (samples x longest sample) stays within the
same `max_tokens_per_microbatch` budget as packing (so both layouts hold the same memory per
micro-batch); each sample is padded at its end to the batch's longest length INSIDE its own
segment (pad labels -100), so every pad token costs the dense and causal-attention work it costs
in a [batch, longest] padded tensor under a flash-style kernel. Tokens/s counts real tokens only,
and MFU counts the FLOPs of real tokens only (`training_flops` of the true lengths): padding is
waste, not work.

Models. CPU: `tiny_hf_config` sized to the tiny tokenizer (hidden 64, 3 layers, ViT 4 blocks), fp32.
CUDA: Qwen2.5-VL-7B's real dimensions (text hidden 3584, MLP 18944, 28 heads / 4 KV heads of 128,
vocab 152,064 as in its config.json; ViT 32 blocks of hidden 1280, MLP 3420, 16 heads, merger to
3584) with random weights in bf16 and the LLM cut to 3 decoder layers so weights, masters, AdamW
state and activations fit one 80 GB card. transformers' `Qwen2_5_VLConfig()` defaults are NOT the 7B
(their text part is 72B-like: hidden 8192, 80 layers), so the values are written out here.
Scaling (stage3[packed] only): the step is also timed with 1 decoder layer;
`per_layer_s = (t(3 layers) - t(1 layer)) / 2`, and the full-depth step is estimated as
`t(3) + (28 - 3) * per_layer_s` (every missing layer is identical to the measured ones; the ViT,
embedding, head and optimizer of the rest are really run). `scaled_tokens_per_s_per_gpu` and
`scaled_mfu` (FLOPs of the full 28-layer model over that time) come from it. The other rows report
the reduced model as measured (`llm_layers` says which).

MFU needs the card's dense bf16 peak (`train.metrics.peak_flops_per_s`); on CPU there is none, so
`mfu` is null there and `achieved_tflops` is reported instead.
Run: `pytest bench/test_bench_e2e.py --benchmark -q -s`.
"""
from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lingshu_fast.config import DataConfig, OptimConfig
from lingshu_fast.data.batch import IGNORE_INDEX, MicroBatch
from lingshu_fast.data.loader import PackedLoader
from lingshu_fast.data.tokenizer import load_tokenizer, special_token_ids
from lingshu_fast.model import build_model, param_groups, set_trainable, tiny_hf_config, training_flops
from lingshu_fast.parallel.state import current_dims
from lingshu_fast.train.engine import StepEngine
from lingshu_fast.train.metrics import SkipTracker, StepTimer, mem_gb, peak_flops_per_s
from lingshu_fast.train.optim import build_optimizer, build_scheduler
from lingshu_fast.train.runner import LocalRunner
from lingshu_fast.train.step import LossOptions, sft_closures

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Per device: data mix (answer words lognormal(mu, sigma), clipped to budget/4; the tiny tokenizer
# makes ~2.5 tokens a word with the question, so token medians are ~100 (CPU) and ~700 (CUDA, as
# the planner bench's lognormal(6.5, 1.0))), image sides, pixel bounds (CPU <= 64 image tokens,
# CUDA <= 1296), token budget, rounds, LLM depths (bench depth, shallower depth for the per-layer
# figure), full depth.
SETUP = {
    "cpu": dict(n_samples=64, text_mu=3.4, text_sigma=0.9, image_share=0.5, side_px=(56, 224),
                min_pixels=3136, max_pixels=50176, budget=512, rounds=3, dtype=torch.float32,
                depths=(3, 1), full_depth=3),
    "cuda": dict(n_samples=96, text_mu=5.6, text_sigma=1.0, image_share=0.5, side_px=(224, 1008),
                 min_pixels=3136, max_pixels=1003520, budget=8192, rounds=3, dtype=torch.bfloat16,
                 depths=(3, 1), full_depth=28),
}[DEVICE]
QWEN25_VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                         max_position_embeddings=128000,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]))
QWEN25_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31])


def model_config(tokenizer, llm_layers: int):
    """The bench model's HF config with the tiny tokenizer's special ids (the data is tokenised with it)."""
    ids = special_token_ids(tokenizer)
    top = dict(image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
               vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
               eos_token_id=ids["im_end_id"], pad_token_id=ids["pad_token_id"], bos_token_id=ids["endoftext_id"])
    if DEVICE == "cpu":
        vocab = (len(tokenizer) + 63) // 64 * 64
        return tiny_hf_config(vocab_size=vocab, text_config=dict(num_hidden_layers=llm_layers), **top)
    text = dict(QWEN25_VL_7B_TEXT, num_hidden_layers=llm_layers)
    return tiny_hf_config(text_config=text, vision_config=QWEN25_VL_7B_VISION, **top)


def write_dataset(folder: Path, *, n_samples: int, captions: bool, seed: int = 0) -> Path:
    """A JSONL of `n_samples` chat records over a few PNGs; returns its path (see the module doc)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = (Path(__file__).resolve().parents[1] / "lingshu_fast/assets/tiny_tokenizer/corpus.txt").read_text().split()
    lo, hi = SETUP["side_px"]
    images = []
    for i in range(12):  # records share images, as captioned data sets reuse scans
        h, w = (int(x) for x in rng.integers(lo, hi + 1, 2))
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(path)
        images.append(path.name)

    def text(n_words: int) -> str:
        return " ".join(rng.choice(words, max(1, n_words)))

    out = folder / ("captions.jsonl" if captions else "mix.jsonl")
    with open(out, "w") as f:
        for _ in range(n_samples):
            n_words = int(np.clip(rng.lognormal(SETUP["text_mu"] - (1.0 if captions else 0.0), SETUP["text_sigma"]),
                                  4, SETUP["budget"] // 4))
            with_image = captions or rng.random() < SETUP["image_share"]
            question = ("<image>" if with_image else "") + text(max(2, n_words // 4))
            rec = {"messages": [{"role": "user", "content": question},
                                {"role": "assistant", "content": text(n_words)}]}
            if with_image:
                rec["images"] = [images[int(rng.integers(len(images)))]]
            f.write(json.dumps(rec) + "\n")
    return out


def data_config(path: Path, pack: bool) -> DataConfig:
    return DataConfig(train=[str(path)], tokenizer="tiny", min_pixels=SETUP["min_pixels"],
                      max_pixels=SETUP["max_pixels"], max_length=SETUP["budget"],
                      max_tokens_per_microbatch=SETUP["budget"], pack=pack, shuffle_window=64)


def pad_merge(singles: list[MicroBatch], pad_id: int) -> MicroBatch:
    """One padded micro-batch of single-sample micro-batches: each padded to the longest inside its segment."""
    longest = max(mb.num_tokens for mb in singles)
    ids, labels, pos, images, grids = [], [], [], [], []
    for mb in singles:
        pad = longest - mb.num_tokens
        ids.append(torch.cat([mb.input_ids, mb.input_ids.new_full((pad,), pad_id)]))
        labels.append(torch.cat([mb.labels, mb.labels.new_full((pad,), IGNORE_INDEX)]))
        tail = mb.position_ids[:, -1:] + torch.arange(1, pad + 1).expand(3, pad)  # positions keep counting
        pos.append(torch.cat([mb.position_ids, tail], dim=1))
        if mb.pixel_values is not None:
            images.append(mb.pixel_values)
            grids.append(mb.image_grid_thw)
    cu = torch.arange(len(singles) + 1, dtype=torch.int32) * longest
    merged = MicroBatch(input_ids=torch.cat(ids), labels=torch.cat(labels), position_ids=torch.cat(pos, dim=1),
                        cu_seqlens=cu, max_seqlen=longest, num_label_tokens=sum(mb.num_label_tokens for mb in singles),
                        sample_ids=[i for mb in singles for i in mb.sample_ids], num_samples=len(singles))
    if images:
        merged.pixel_values, merged.image_grid_thw = torch.cat(images), torch.cat(grids)
        patches = merged.image_grid_thw.prod(dim=1)
        merged.vit_cu_seqlens = torch.cat([patches.new_zeros(1), patches.cumsum(0)]).to(torch.int32)
    return merged


def padded_batches(singles: list[MicroBatch], budget: int, pad_id: int) -> list[MicroBatch]:
    """Greedy groups in the given order while count x longest <= budget, each padded (see module doc)."""
    groups, current, longest = [], [], 0
    for mb in singles:
        new_longest = max(longest, mb.num_tokens)
        if current and (len(current) + 1) * new_longest > budget:
            groups.append(current)
            current, new_longest = [], mb.num_tokens
        current.append(mb)
        longest = new_longest
    if current:
        groups.append(current)
    return [pad_merge(g, pad_id) for g in groups]


@dataclasses.dataclass
class Workload:
    microbatches: list[MicroBatch]
    real_tokens: int
    flops: float  # model FLOPs of the real tokens (training_flops of the true lengths)
    slots: int  # token slots computed (real + padding)


def workload(mbs: list[MicroBatch], real_lengths: list[list[int]], config) -> Workload:
    flops = sum(training_flops(config, lens, mb.image_grid_thw) for mb, lens in zip(mbs, real_lengths))
    return Workload([mb.to(DEVICE) for mb in mbs], sum(map(sum, real_lengths)), flops,
                    sum(mb.num_tokens for mb in mbs))


def host(grid):
    """image_grid_thw on the CPU (the FLOP count's window layout runs there), or None."""
    return None if grid is None else grid.cpu()


class Trainer:
    """The model, its optimizer and one timed training step over a Workload."""

    def __init__(self, config, frozen: list[str]):
        self.model = build_model(config, seed=0, dtype=SETUP["dtype"], device=DEVICE)
        set_trainable(self.model, frozen)
        optim_cfg = OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant")
        self.optimizer = build_optimizer(param_groups(self.model), optim_cfg)
        self.runner = LocalRunner(self.model, None)
        self.engine = StepEngine(self.model, self.optimizer, build_scheduler(self.optimizer, optim_cfg, 1),
                                 self.runner, current_dims(), grad_clip=1.0, skips=SkipTracker(10**9))
        self.config = config

    def step(self, work: Workload) -> float:
        labels = sum(mb.num_label_tokens for mb in work.microbatches)
        return self.engine.step(*sft_closures(self.runner, work.microbatches, LossOptions()), count=labels).loss

    def time_step(self, work: Workload) -> float:
        timer = StepTimer(DEVICE).start()
        loss = self.step(work)
        assert np.isfinite(loss), "the benchmark step's loss is not finite"
        return timer.stop()


def figures(work: Workload, step_s: float) -> dict:
    peak = peak_flops_per_s(DEVICE)
    return dict(tokens_per_s_per_gpu=round(work.real_tokens / step_s, 1),
                mfu=None if peak is None else round(work.flops / step_s / peak, 4),
                achieved_tflops=round(work.flops / step_s / 1e12, 4), step_s=round(step_s, 4),
                real_tokens=work.real_tokens, token_slots=work.slots, microbatches=len(work.microbatches),
                slot_efficiency=round(work.real_tokens / work.slots, 4),
                budget_efficiency=round(work.real_tokens / (len(work.microbatches) * SETUP["budget"]), 4))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tokenizer):
    """The stage-3 sample set as packed and as padded micro-batches (CPU tensors, real lengths)."""
    path = write_dataset(tmp_path_factory.mktemp("e2e_data"), n_samples=SETUP["n_samples"], captions=False)
    packed = list(PackedLoader([path], tokenizer, data_config(path, True), seed=0, epochs=1))
    singles = list(PackedLoader([path], tokenizer, data_config(path, False), seed=0, epochs=1))
    padded = padded_batches(singles, SETUP["budget"], special_token_ids(tokenizer)["pad_token_id"])
    return {"packed": (packed, [mb.segment_lengths for mb in packed]),
            "padded": (padded, [[mb.num_tokens for mb in g] for g in _groups_of(singles, padded)]),
            "singles": singles}


def _groups_of(singles: list[MicroBatch], padded: list[MicroBatch]) -> list[list[MicroBatch]]:
    by_id = {mb.sample_ids[0]: mb for mb in singles}
    return [[by_id[i] for i in mb.sample_ids] for mb in padded]


def shapes_info(config, work: Workload) -> dict:
    t, v = config.text_config, config.vision_config
    return dict(dtype=str(SETUP["dtype"]).replace("torch.", ""), llm_layers=t.num_hidden_layers,
                hidden=t.hidden_size, vocab=t.vocab_size, vit_blocks=v.depth, vit_hidden=v.hidden_size,
                budget_tokens=SETUP["budget"], n_samples=SETUP["n_samples"],
                images=sum(mb.num_images for mb in work.microbatches))


def run_rows(benchmark, trainer: Trainer, work: Workload) -> float:
    """pytest-benchmark rounds of the step (one warm-up); returns the BEST step time in seconds: on a
    shared machine other processes only ever add time, so the minimum is the least disturbed figure."""
    benchmark.pedantic(trainer.time_step, args=(work,), rounds=SETUP["rounds"], iterations=1, warmup_rounds=1)
    return float(benchmark.stats.stats.min)


def release() -> None:
    """Free the last model's memory (callers `del` their references first): on CUDA two 7B-width
    models with their optimizer states do not fit one card together."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def test_bench_e2e_stage1(benchmark, bench_info, tmp_path, tokenizer):
    path = write_dataset(tmp_path, n_samples=SETUP["n_samples"], captions=True, seed=1)
    mbs = list(PackedLoader([path], tokenizer, data_config(path, True), seed=0, epochs=1))
    config = model_config(tokenizer, SETUP["depths"][0])
    trainer = Trainer(config, frozen=["llm"])
    work = workload(mbs, [mb.segment_lengths for mb in mbs], config)
    step_s = run_rows(benchmark, trainer, work)
    assert not any(p.requires_grad for p in param_groups(trainer.model)["llm"]), "stage 1 must freeze the LLM"
    bench_info.update(op="e2e_stage1", layout="packed", frozen="llm", **shapes_info(config, work),
                      **figures(work, step_s), peak_mem_gb=round(mem_gb(DEVICE), 3))
    print(f"\nstage1 (LLM frozen): {bench_info['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, mfu {bench_info['mfu']}")
    del trainer
    release()


def _stage3_per_layer(tokenizer, work: Workload, step_s: float) -> dict:
    """Per-layer time from a second, shallower model (module doc); scaled full-depth figures."""
    big, small = SETUP["depths"]
    config_small = model_config(tokenizer, small)
    trainer = Trainer(config_small, frozen=[])
    trainer.time_step(work)  # warm-up
    small_s = min(trainer.time_step(work) for _ in range(SETUP["rounds"]))
    del trainer
    release()
    per_layer_s = max(step_s - small_s, 0.0) / (big - small)
    full = SETUP["full_depth"]
    scaled_s = step_s + (full - big) * per_layer_s
    lens = [mb.segment_lengths for mb in work.microbatches]
    config_full = model_config(tokenizer, full)
    full_flops = sum(training_flops(config_full, s, host(mb.image_grid_thw)) for mb, s in zip(work.microbatches, lens))
    peak = peak_flops_per_s(DEVICE)
    return dict(per_layer_ms=round(per_layer_s * 1e3, 3), shallow_step_s=round(small_s, 4), full_llm_layers=full,
                scaled_step_s=round(scaled_s, 4), scaled_tokens_per_s_per_gpu=round(work.real_tokens / scaled_s, 1),
                scaled_mfu=None if peak is None else round(full_flops / scaled_s / peak, 4))


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_bench_e2e_stage3(benchmark, bench_info, tokenizer, layouts, layout):
    mbs, lens = layouts[layout]
    config = model_config(tokenizer, SETUP["depths"][0])
    trainer = Trainer(config, frozen=[])
    work = workload(mbs, lens, config)
    step_s = run_rows(benchmark, trainer, work)
    bench_info.update(op="e2e_stage3", layout=layout, **shapes_info(config, work), **figures(work, step_s),
                      peak_mem_gb=round(mem_gb(DEVICE), 3))
    del trainer
    release()
    if layout == "packed":
        bench_info.update(_stage3_per_layer(tokenizer, work, step_s))
    print(f"\nstage3[{layout}]: {bench_info['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, mfu {bench_info['mfu']}, "
          f"{bench_info['microbatches']} micro-batches, slot efficiency {bench_info['slot_efficiency']:.1%}")


def test_bench_e2e_stage3_packing_gain(benchmark, bench_info, tokenizer, layouts):
    """Packed and padded steps alternate on one model, best of `rounds` each: the ratio sees one machine state."""
    config = model_config(tokenizer, SETUP["depths"][0])
    trainer = Trainer(config, frozen=[])
    works = {name: workload(*layouts[name], config) for name in ("packed", "padded")}
    assert works["packed"].real_tokens == works["padded"].real_tokens, "both layouts must hold the same samples"
    assert sorted(i for mb in works["packed"].microbatches for i in mb.sample_ids) == \
        sorted(i for mb in works["padded"].microbatches for i in mb.sample_ids)
    best_s = {name: float("inf") for name in works}
    for name, work in works.items():
        trainer.time_step(work)  # warm-up both shapes
    for _ in range(SETUP["rounds"]):
        for name, work in works.items():
            best_s[name] = min(best_s[name], trainer.time_step(work))
    benchmark.pedantic(trainer.time_step, args=(works["packed"],), rounds=1, iterations=1)
    gain = best_s["padded"] / best_s["packed"]  # same real tokens, so the tokens/s ratio is the time ratio
    packed, padded = figures(works["packed"], best_s["packed"]), figures(works["padded"], best_s["padded"])
    bench_info.update(op="e2e_stage3_packing_gain", **shapes_info(config, works["packed"]), **packed,
                      padded_tokens_per_s_per_gpu=padded["tokens_per_s_per_gpu"], padded_mfu=padded["mfu"],
                      padded_slot_efficiency=padded["slot_efficiency"], padded_microbatches=padded["microbatches"],
                      packing_gain=round(gain, 3), packing_gain_target=1.4)
    print(f"\npacking gain: {gain:.2f}x ({packed['tokens_per_s_per_gpu']:,.0f} vs "
          f"{padded['tokens_per_s_per_gpu']:,.0f} "
          f"tokens/s/GPU; slots {packed['slot_efficiency']:.1%} vs {padded['slot_efficiency']:.1%} real)")
    del trainer
    release()
    assert gain > 0 and np.isfinite(gain)


def test_bench_e2e_rl(benchmark, bench_info, tokenizer, layouts):
    """One GRPO update without generation (sampling speed belongs to the inference engine): the
    reference model's log-probs (a no-grad forward; the policy's own weights stand in for the frozen
    copy, same cost), then the engine's step with the GRPO closures (k3 KL, clipped ratio).
    Prompts are the stage-3 samples; each gets `group` random responses of lognormal length
    (CPU median ~40 tokens, CUDA ~400), random advantages. FLOPs: training (3x forward) of every
    sequence plus one reference forward, with the ViT once per distinct prompt per micro-batch."""
    from lingshu_fast.config import RLConfig
    from lingshu_fast.data.prompt import Prompt
    from lingshu_fast.model import forward_flops
    from lingshu_fast.rl import step as rl_step
    rng = np.random.default_rng(2)
    group, mu = (4, 3.7) if DEVICE == "cpu" else (8, 6.0)
    singles = layouts["singles"][: 8 if DEVICE == "cpu" else 16]
    prompts = [Prompt(input_ids=s.input_ids.numpy(), position_ids=s.position_ids.numpy(),
                                  pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw) for s in singles]
    vocab_hi = min(len(tokenizer), 1000)
    seq_prompt = [p for p in range(len(prompts)) for _ in range(group)]
    responses = [rng.integers(10, vocab_hi, int(np.clip(rng.lognormal(mu, 0.8), 4, SETUP["budget"] // 2))).tolist()
                 for _ in seq_prompt]
    advantages = rng.standard_normal(len(seq_prompt)).tolist()
    rmbs = rl_step.pack_sequences(prompts, seq_prompt, responses, advantages, list(range(len(seq_prompt))),
                                  SETUP["budget"])
    config = model_config(tokenizer, SETUP["depths"][0])
    trainer = Trainer(config, frozen=[])
    rmbs = [r.to(DEVICE) for r in rmbs]
    rl_cfg = RLConfig(beta=1e-3)
    global_count = sum(rl_step.norm_count(r, rl_cfg.loss_agg) for r in rmbs)

    def step() -> float:
        timer = StepTimer(DEVICE).start()
        for r in rmbs:
            r.ref_logprobs = rl_step.sequence_logprobs(trainer.model, r, temperature=rl_cfg.temperature)
        result = trainer.engine.step(*rl_step.grpo_closures(trainer.runner, rmbs, rl_cfg), count=global_count,
                                     stat_keys=rl_step.STAT_KEYS)
        assert np.isfinite(result.loss)
        return timer.stop()

    benchmark.pedantic(step, rounds=SETUP["rounds"], iterations=1, warmup_rounds=1)
    step_s = float(benchmark.stats.stats.min)
    flops = 0.0
    for r in rmbs:
        lens, grid = r.mb.segment_lengths, host(r.prompt_grid_thw)
        flops += training_flops(config, lens, grid) + sum(forward_flops(config, lens, grid).values())
    tokens = sum(r.mb.num_tokens for r in rmbs)
    peak = peak_flops_per_s(DEVICE)
    bench_info.update(op="e2e_rl", **shapes_info(config, Workload([r.mb for r in rmbs], tokens, flops, tokens)),
                      tokens_per_s_per_gpu=round(tokens / step_s, 1), step_s=round(step_s, 4),
                      mfu=None if peak is None else round(flops / step_s / peak, 4),
                      achieved_tflops=round(flops / step_s / 1e12, 4), sequences=len(seq_prompt), group=group,
                      response_tokens=sum(map(len, responses)), microbatches=len(rmbs), loss_agg=rl_cfg.loss_agg,
                      peak_mem_gb=round(mem_gb(DEVICE), 3))
    bench_info["images"] = sum(int(r.prompt_grid_thw.shape[0]) for r in rmbs if r.prompt_grid_thw is not None)
    print(f"\nrl: {bench_info['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU over {len(seq_prompt)} sequences")
    trainer = None  # the closure above still names it: drop the model before release()
    release()

