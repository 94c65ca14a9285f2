"""`lingshu-fast demo`: the four Lingshu stages on the embedded tiny model and medical data, on CPU.

It builds the tiny dataset (synthetic scans, real CT/MR DICOM slices from pydicom, captions,
instructions, verifiable questions), then runs stage 1 (vision tower + merger on captions),
stage 2 (all weights on varied captions), stage 3 (packed instruction tuning) and stage 4 (GRPO on
verifiable questions, printing the mean reward at the start and end), each starting from
the previous stage's Hugging Face export, evaluates the tiny held-out benchmark at the end of each
stage, prints a per-stage table (steps, final loss, tokens/s/GPU, eval accuracy) and checks that
transformers loads the final export and generates from it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from lingshu_fast.config import load_config
from lingshu_fast.stages import run_stage

STAGES = [
    (1, "tiny-stage1", "captions"),
    (2, "tiny-stage2", "captions_varied"),
    (3, "tiny-sft", "instruct"),
    (4, "tiny-rl", "rl"),
]


def _run_stage(stage: int, recipe: str, data: Path, bench: Path, out: Path, init_from: Optional[Path],
               extra: list[str]) -> dict:
    overrides = [f"run.dir={out / f'stage{stage}'}", f"data.train=[{data}]", *extra]
    if stage < 4:  # stage 4 evaluates nothing during RL; its reward curve is the figure
        overrides += [f"eval.benchmarks=[{bench}]", "eval.max_new_tokens=8"]
    if init_from is not None:
        overrides.append(f"model.init_from={init_from}")
    cfg = load_config(recipe, overrides)
    t0 = time.perf_counter()
    summary = run_stage(cfg)
    summary["wall_s"] = time.perf_counter() - t0
    summary["hf"] = Path(cfg.run.dir) / "hf"
    return summary


def _check_export(hf_dir: Path) -> str:
    """Load the export with transformers, as a user would, and greedily generate a few tokens."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    prompt = "<|im_start|>user\nWhat does CT stand for?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _reward_curve(metrics: Path) -> Optional[tuple[float, float]]:
    """Mean reward of the first and of the last three RL steps (one rollout is noisy)."""
    import json

    if not metrics.exists():
        return None
    rewards = [r["reward_mean"] for r in map(json.loads, metrics.read_text().splitlines()) if "reward_mean" in r]
    if not rewards:
        return None
    head, tail = rewards[:3], rewards[-3:]
    return sum(head) / len(head), sum(tail) / len(tail)


def run_demo(out_dir: str = "runs/demo", extra_overrides: Optional[list[str]] = None) -> list[dict]:
    from lingshu_fast.data.demo_data import build_demo_dataset
    from lingshu_fast.parallel.state import shutdown_parallel

    out = Path(out_dir)
    paths = build_demo_dataset(out / "data")
    print(f"lingshu-fast demo: dataset in {out / 'data'}", flush=True)
    rows, init_from = [], None
    try:
        for stage, recipe, data_key in STAGES:
            print(f"\n== stage {stage} ({recipe}) ==", flush=True)
            summary = _run_stage(stage, recipe, paths[data_key], paths["eval"], out, init_from,
                                 list(extra_overrides or []))
            rows.append(summary)
            init_from = summary["hf"]
    finally:
        shutdown_parallel()
    print("\nstage  steps  final loss  tokens/s/GPU  eval acc  wall s")
    for r in rows:
        acc = r.get("eval_accuracy")
        acc_text = "-" if acc is None else f"{acc:.3f}"
        print(f"{r['stage']:>5}  {r['steps']:>5}  {r['loss']:>10.4f}  {r['tokens_per_s_per_gpu']:>12.1f}  "
              f"{acc_text:>8}  {r['wall_s']:>6.1f}")
    rl = _reward_curve(out / "stage4" / "metrics.jsonl")
    if rl is not None:
        print(f"\nstage 4 mean reward (first 3 -> last 3 rollouts): {rl[0]:.3f} -> {rl[1]:.3f}")
    text = _check_export(rows[-1]["hf"])
    print(f"\ntransformers loaded {rows[-1]['hf']} and generated: {text!r}")
    return rows
