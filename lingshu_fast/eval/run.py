"""Evaluation: benchmarks -> greedy generation on our own model -> MedEvalKit's scores.

`evaluate(model, tokenizer, benchmarks, out_dir=...)` is what the trainer calls (every `eval.every`
steps and at the end of a stage) and what `lingshu-fast eval RECIPE [key=value ...]` runs.

- Benchmarks: our JSONL files and the Lingshu suite's release folders (`eval.suite`); images
  embedded in Parquet releases are written once under `out_dir/images`.
- Prompts: `build_eval_messages` (MedEvalKit's wording) rendered by the training chat template
  (`ChatTemplate.render_prompt`), images preprocessed exactly as in training (`data.min_pixels`,
  `data.max_pixels`), M-RoPE ids from `data.rope`: the model sees what it was trained on.
- Generation: `lingshu_fast.model.generate` (the RL rollout generator), greedy, stopping at
  `<|im_end|>` / the tokenizer's eos / `<|endoftext|>`.
- Layouts: TP ranks generate the same batch together; pipeline stages relay each step to the next
  (`parallel/relay.py`), interleaved chunks included; data-parallel ranks take every dp-th item
  and the predictions are gathered, so the scores do not depend on the layout.
- Scoring: `eval.scoring` (`medevalkit`, the default, or `lenient`), with the
  optional LLM judge (`eval.judge_url`, total deadline `eval.judge_timeout_s`, key only from the
  variable `eval.judge_api_key_env` names).
- Output (global rank 0): `<tag>_report.json`, `<tag>_wrong.jsonl`, `<tag>_predictions.jsonl` (every
  item with its prediction) under `out_dir`, and the table printed with Lingshu-7B's published
  figure beside each benchmark. Every rank returns the report.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch.distributed as dist

from lingshu_fast.data.prompt import Prompt, make_prompt
from lingshu_fast.eval.benchmark_files import BenchmarkError, build_eval_messages
from lingshu_fast.eval.judge import Judge, judge_from_config
from lingshu_fast.eval.report import format_table, report, report_metrics, write_report
from lingshu_fast.eval.scoring import score_predictions
from lingshu_fast.eval.suite import load_benchmarks
from lingshu_fast.kernels.vision_geometry import image_tokens
from lingshu_fast.model.generate import generate


def eval_prompt(item: dict, template, hf_config, *, min_pixels: int, max_pixels: int,
                system_prompt: Optional[str] = None) -> Prompt:
    """One benchmark item -> the generation prompt (ids, M-RoPE positions, pixels)."""
    from lingshu_fast.data.images import preprocess

    pixel_values = grid = None
    counts: list[int] = []
    if item.get("images"):
        pixel_values, grid = preprocess(item["images"], min_pixels=min_pixels, max_pixels=max_pixels)
        counts = [image_tokens(*row) for row in grid.tolist()]
    ids = template.render_prompt(build_eval_messages(item), counts, system_prompt=system_prompt)
    return make_prompt(ids, pixel_values, grid, image_token_id=hf_config.image_token_id,
                       vision_start_token_id=hf_config.vision_start_token_id)


def _check_tokenizer(template, hf_config) -> None:
    """The tokenizer's image/vision ids must be the model's, or images land on the wrong tokens."""
    mismatched = [f"{key}: tokenizer {template.ids[key]} vs model {getattr(hf_config, key)}"
                  for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id")
                  if template.ids[key] != getattr(hf_config, key)]
    if mismatched:
        raise ValueError("tokenizer and model disagree on special token ids (" + "; ".join(mismatched)
                         + "); use the tokenizer the model was trained with (data.tokenizer)")


def _data_parallel():
    """(dp rank, dp size, dp group) from Megatron's parallel state; (0, 1, None) when absent."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return 0, 1, None
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), ps.get_data_parallel_group()


def _generate_predictions(model, tokenizer, template, items, *, max_new_tokens, batch_size, min_pixels,
                          max_pixels, system_prompt) -> tuple[list[str], int]:
    stop_ids = sorted({template.ids["im_end_id"], template.ids["eos_token_id"], template.ids["endoftext_id"]})
    predictions: list[str] = []
    new_tokens = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts = [eval_prompt(item, template, model.config, min_pixels=min_pixels, max_pixels=max_pixels,
                               system_prompt=system_prompt) for item in chunk]
        outputs = generate(model, prompts, max_new_tokens=max_new_tokens, stop_token_ids=stop_ids,
                           pad_token_id=template.ids["pad_token_id"])
        for out in outputs:
            new_tokens += len(out.token_ids)
            predictions.append(tokenizer.decode(out.token_ids, skip_special_tokens=True).strip())
    return predictions, new_tokens


def evaluate(model, tokenizer, benchmarks: Sequence[Union[str, Path]], *, out_dir: Union[str, Path],
             max_new_tokens: int = 256, batch_size: int = 8, min_pixels: int = 3136,
             max_pixels: int = 12845056, judge: Optional[Judge] = None, tag: str = "eval",
             reasoning: bool = False, system_prompt: Optional[str] = None, image_root=None,
             scoring: str = "medevalkit", verbose: bool = True) -> dict:
    """Greedy-generate an answer for every item of every benchmark (file, release folder or
    NAME=PATH; see `eval.suite`) and score it.

    Returns `report.report(...)` plus `generation` = {items, new_tokens, seconds}; the same dict on
    every rank. All ranks must call it (it is collective under TP/DP). `reasoning=True` uses
    MedEvalKit's REASONING prompts (answer in \\boxed{}). Raises BenchmarkError on a bad benchmark.
    """
    from lingshu_fast.data.template import ChatTemplate

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    if not benchmarks:
        raise ValueError("no benchmark files given (eval.benchmarks=[a.jsonl,b.jsonl])")
    items = [item for entry in benchmarks
             for item in load_benchmarks(entry, image_cache=Path(out_dir) / "images", reasoning=reasoning,
                                         image_root=image_root)]
    template = ChatTemplate(tokenizer)
    _check_tokenizer(template, model.config)
    dp_rank, dp_size, dp_group = _data_parallel()
    mine = list(range(dp_rank, len(items), dp_size))
    start_s = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        local, new_tokens = _generate_predictions(
            model, tokenizer, template, [items[i] for i in mine], max_new_tokens=max_new_tokens,
            batch_size=batch_size, min_pixels=min_pixels, max_pixels=max_pixels, system_prompt=system_prompt)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start_s
    predictions: list[Optional[str]] = [None] * len(items)
    if dp_size > 1:
        gathered: list = [None] * dp_size
        dist.all_gather_object(gathered, (mine, local, new_tokens), group=dp_group)
        new_tokens = 0
        for indices, preds, tokens in gathered:
            new_tokens += tokens
            for i, pred in zip(indices, preds):
                predictions[i] = pred
    else:
        predictions = list(local)

    rank = dist.get_rank() if dist.is_initialized() else 0
    payload = [None]
    if rank == 0:  # score once (an LLM judge is asked once per item), write, print
        rows = score_predictions(items, predictions, scoring=scoring, judge=judge)
        rep = report(rows)
        rep["generation"] = {"items": len(items), "new_tokens": new_tokens, "seconds": seconds}
        paths = write_report(rep, rows, out_dir, tag=tag)
        with open(Path(out_dir) / f"{tag}_predictions.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        if verbose:
            print(f"lingshu-fast eval [{tag}]: {len(items)} items, {new_tokens} tokens generated in "
                  f"{seconds:.1f} s; report {paths['report']}\n{format_table(rep)}", flush=True)
        payload = [rep]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    return payload[0]


def eval_metrics_rows(rep: dict, stage: int, step: int) -> list[dict]:
    """The metrics.jsonl row(s) of one evaluation: [{stage, step, eval/<benchmark>/accuracy...,
    eval/overall/accuracy}]; `step` is the training step it evaluated (so resume truncation
    drops it together with that step's training row)."""
    return [{"stage": stage, "step": step, **report_metrics(rep)}]


def scheduled_eval(cfg, model, tokenizer, *, step: int, final: bool = False) -> Optional[dict]:
    """The trainer's hook, called by every rank after a step: evaluates `eval.benchmarks` when
    `final` (end of a stage) or when `eval.every` divides `step`; returns the flat metrics
    {eval/<benchmark>/accuracy, eval/overall/accuracy} for that step's metrics row, else None.
    Reports go to run.dir/eval/stage<S>_step<N>_*. `model` is the rank's training model (a
    pipeline stage or its interleaved chunks under parallel.pp > 1)."""
    due = final or (cfg.eval.every > 0 and step % cfg.eval.every == 0)
    if not cfg.eval.benchmarks or not due:
        return None
    rep = evaluate(model, tokenizer, cfg.eval.benchmarks, out_dir=Path(cfg.run.dir) / "eval",
                   tag=f"stage{cfg.train.stage}_step{step}", **eval_settings(cfg))
    return report_metrics(rep)


def eval_settings(cfg) -> dict:
    """evaluate()'s keyword arguments from a config (everything but the benchmarks and outputs)."""
    return dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels, judge=judge_from_config(cfg.eval),
                system_prompt=cfg.data.system_prompt, scoring=cfg.eval.scoring, reasoning=cfg.eval.reasoning)


def main(args) -> int:
    """`lingshu-fast eval RECIPE [key=value ...]`: evaluate `model.init_from` (or `model.path`) on
    `eval.benchmarks`; the report goes to `run.dir/eval`."""
    from lingshu_fast.config import ConfigError, load_config
    from lingshu_fast.data.tokenizer import load_tokenizer
    from lingshu_fast.train.build import build_rank_model, pick_device, pick_dtype, resolve_model_path
    from lingshu_fast.train.layout import start_parallel

    cfg = load_config(args.recipe, args.overrides)
    if not cfg.eval.benchmarks:
        raise ConfigError("eval.benchmarks is empty: give benchmark JSONL files or release folders "
                          "(eval.benchmarks=[/data/VQA_RAD,/data/SLAKE,my_bench.jsonl])")
    missing = [b for b in cfg.eval.benchmarks if not Path(b.split("=", 1)[-1]).exists()]
    if missing:
        raise ConfigError(f"eval.benchmarks: not found: {missing}")
    settings = eval_settings(cfg)  # a judge key problem stops here, before the model is built
    dims = start_parallel(cfg)
    device = pick_device(dims)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    # this rank's pipeline stage(s), split as training splits them (the whole model at pp=1), frozen
    model = build_rank_model(cfg, dims, resolve_model_path(cfg, tokenizer), dtype=pick_dtype(cfg, device),
                             device=device, frozen=True)
    try:
        rep = evaluate(model, tokenizer, cfg.eval.benchmarks, out_dir=Path(cfg.run.dir) / "eval", **settings)
    except BenchmarkError as err:
        raise ConfigError(str(err)) from None
    return 0 if rep["overall"]["total"] else 1
