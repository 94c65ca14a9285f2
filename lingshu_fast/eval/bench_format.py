"""Benchmark files, eval prompts and reports.

A benchmark is a JSONL file, one question per line:
  {"question": str, "options": {"A": str, ...} | [str, ...] (optional), "answer": str | [str, ...],
   "images": [path, ...] | path (optional; PNG/JPEG/DICOM, relative to `image_root` or the file's
   folder), "task": "mcq" | "yesno" | "open" (optional), "id": any (optional)}
An mcq answer is a letter ("C") or an option's text; a yesno answer is yes/no; an open answer is a
string or a list of accepted strings. When `task` is absent it is inferred (options -> mcq, yes/no ->
yesno, else open); any other `task` value is kept as the item's `category` (a breakdown in the
report) and the scoring task is inferred. The benchmark's name is the file's stem unless given.

`report(results)` -> per-benchmark accuracy and counts (overall, per task, per category);
`format_table` prints it; `write_report` saves `<tag>_report.json` and the wrong items as
`<tag>_wrong.jsonl` for inspection; `report_metrics` gives the `eval/<benchmark>/accuracy` rows.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from lingshu_fast.data.formats import iter_jsonl
from lingshu_fast.rl.extract import gold_choice, normalize_text, normalize_yes_no, options_as_dict

TASKS = ("mcq", "yesno", "open")
IMAGE_MARKER = "<image>"  # the marker the data formats and chat template place images by

_INSTRUCTIONS = {
    "mcq": "Answer with the option's letter from the given choices directly.",
    "yesno": "Please answer yes or no.",
    "open": "Answer the question using a single word or phrase.",
}
_REASONING_INSTRUCTION = ("First think step by step inside <think> </think>, then give the final "
                          "answer inside <answer> </answer>.")


class BenchmarkError(ValueError):
    """A benchmark file is unusable; the message names file:line, the field and what to do."""


def _fail(where: str, message: str):
    raise BenchmarkError(f"{where}: {message}")


def infer_bench_task(item: dict) -> str:
    """options -> mcq; a yes/no answer -> yesno; else open."""
    if item.get("options"):
        return "mcq"
    if isinstance(item.get("answer"), str) and normalize_yes_no(item["answer"]) is not None:
        return "yesno"
    return "open"


def validate_item(raw: Any, where: str, *, image_root: Path, check_images: bool = True) -> dict:
    """One JSONL record -> a checked item with `task`, `category`, resolved `images`, `gold`."""
    if not isinstance(raw, dict):
        _fail(where, f"expected a JSON object, got {type(raw).__name__}")
    item = dict(raw)
    question = item.get("question")
    if not isinstance(question, str) or not question.strip():
        _fail(where, "'question' must be a non-empty string")
    answer = item.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = item["answer"] = str(answer)
    if isinstance(answer, list):
        if not answer or not all(isinstance(a, str) and a.strip() for a in answer):
            _fail(where, "'answer' as a list must hold non-empty strings")
    elif not isinstance(answer, str) or not answer.strip():
        _fail(where, "'answer' is missing or empty")
    options = item.get("options")
    if options is not None:
        if not isinstance(options, (dict, list)) or isinstance(options, str):
            _fail(where, "'options' must be a dict {'A': text} or a list of texts")
        try:
            opts = options_as_dict(options)
        except (TypeError, ValueError) as err:
            _fail(where, f"'options': {err}")
        if len(opts) < 2 or not all(isinstance(v, str) and v.strip() for v in options_as_dict(options).values()):
            _fail(where, "'options' needs at least two non-empty texts")
        bad_keys = [k for k in opts if len(k) != 1 or not k.isalpha()]
        if bad_keys:
            _fail(where, f"option keys must be single letters, got {bad_keys}")
    label = str(item.get("task") or "").strip().lower()
    task = label if label in TASKS else infer_bench_task(item)
    item["category"] = label if label and label not in TASKS else item.get("category")
    item["task"] = task
    if task == "mcq":
        if not options:
            _fail(where, "task 'mcq' needs 'options'")
        if not isinstance(answer, str) or gold_choice(answer, options) is None:
            _fail(where, f"mcq answer {answer!r} is neither an option letter ({''.join(options_as_dict(options))}) "
                         "nor one option's text")
        item["gold"] = gold_choice(answer, options)
    elif task == "yesno":
        gold = normalize_yes_no(answer) if isinstance(answer, str) else None
        if gold is None:
            _fail(where, f"task 'yesno' needs answer yes or no, got {answer!r}")
        item["gold"] = gold
    else:
        golds = answer if isinstance(answer, list) else [answer]
        if not any(normalize_text(g) for g in golds):
            _fail(where, f"open answer {answer!r} is empty after normalisation (only punctuation/articles)")
        item["gold"] = golds
    item["images"] = _resolve_images(item.get("images"), where, image_root, check_images)
    markers = question.count(IMAGE_MARKER)
    if markers and markers != len(item["images"]):
        _fail(where, f"question has {markers} {IMAGE_MARKER} markers but {len(item['images'])} images")
    return item


def _resolve_images(images: Any, where: str, image_root: Path, check: bool) -> list[str]:
    if images is None:
        return []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        _fail(where, "'images' must be a path or a list of paths")
    resolved = []
    for path in images:
        full = Path(path) if os.path.isabs(path) else image_root / path
        if check and not full.is_file():
            _fail(where, f"image not found: {path!r} (looked at {full}); fix the path or pass image_root")
        resolved.append(str(full))
    return resolved


def load_benchmark(path: Union[str, Path], *, name: Optional[str] = None,
                   image_root: Union[str, Path, None] = None, check_images: bool = True) -> list[dict]:
    """Read and validate a benchmark JSONL; every item gains `benchmark`, `id`, `line`, `task`,
    `category`, `gold` (letter | 'yes'/'no' | accepted strings) and absolute `images`."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file not found: {path}")
    name = name or path.stem
    root = Path(image_root) if image_root is not None else path.parent
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, raw, bad_json in iter_jsonl(f):
            where = f"{path}:{line_no}"
            if bad_json is not None:
                raise BenchmarkError(f"{where}: invalid JSON ({bad_json})")
            item = validate_item(raw, where, image_root=root, check_images=check_images)
            item.update(benchmark=name, line=line_no)
            item.setdefault("id", f"{name}:{line_no}")
            items.append(item)
    if not items:
        raise BenchmarkError(f"{path}: no questions in the file")
    return items


def build_eval_messages(item: dict, *, reasoning: bool = False) -> list[dict]:
    """The user turn for one item (MedEvalKit-style prompt): one `<image>` marker per image first
    (unless the question places them), the question, the lettered options "A. …", and the answer
    instruction; `reasoning=True` asks for the RL format <think>…</think><answer>…</answer>."""
    question = item["question"].strip()
    lines = []
    images = item.get("images") or []
    prefix = "" if IMAGE_MARKER in question else IMAGE_MARKER * len(images)
    task = item.get("task") or infer_bench_task(item)
    if task == "mcq":
        lines.append(f"Question: {question}")
        lines.append("Options:")
        lines += [f"{k}. {v}" for k, v in options_as_dict(item["options"]).items()]
    else:
        lines.append(question)
    lines.append(_INSTRUCTIONS[task] if task in _INSTRUCTIONS else _INSTRUCTIONS["open"])
    if reasoning:
        lines[-1] = lines[-1] + " " + _REASONING_INSTRUCTION
    return [{"role": "user", "content": prefix + "\n".join(lines)}]


# --------------------------------------------------------------------------- reports


def _acc(correct: int, total: int) -> dict:
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}


def report(results: Sequence[dict]) -> dict:
    """results: rows with `benchmark`, `task`, `correct` (and optional `category`) ->
    {"benchmarks": {name: {accuracy, correct, total, by_task: {...}, by_category: {...}}},
     "overall": {accuracy (micro over items), macro_accuracy (mean over benchmarks), correct, total}}."""
    counts: dict = defaultdict(lambda: [0, 0])
    for row in results:
        bench = row.get("benchmark", "benchmark")
        keys = [(bench, None, None), (bench, "task", row.get("task") or "?")]
        if row.get("category"):
            keys.append((bench, "category", row["category"]))
        for key in keys:
            counts[key][0] += bool(row["correct"])
            counts[key][1] += 1
    benchmarks: dict = {}
    for (bench, kind, value), (correct, total) in sorted(counts.items(), key=lambda kv: str(kv[0])):
        entry = benchmarks.setdefault(bench, {"by_task": {}, "by_category": {}})
        if kind is None:
            entry.update(_acc(correct, total))
        else:
            entry["by_" + kind][value] = _acc(correct, total)
    correct = sum(e["correct"] for e in benchmarks.values())
    total = sum(e["total"] for e in benchmarks.values())
    overall = _acc(correct, total)
    overall["macro_accuracy"] = (sum(e["accuracy"] for e in benchmarks.values()) / len(benchmarks)
                                 if benchmarks else 0.0)
    return {"benchmarks": benchmarks, "overall": overall}


def format_table(rep: dict) -> str:
    """A fixed-width table: one row per benchmark and task/category, then the overall line."""
    header = f"{'benchmark':<28} {'split':<18} {'accuracy':>8} {'correct':>8} {'total':>6}"
    lines = [header, "-" * len(header)]
    for bench, e in rep["benchmarks"].items():
        lines.append(f"{bench:<28} {'all':<18} {100 * e['accuracy']:>7.2f}% {e['correct']:>8} {e['total']:>6}")
        subs = [(f"task={k}", v) for k, v in e["by_task"].items()] if len(e["by_task"]) > 1 else []
        subs += [(f"{k}", v) for k, v in e["by_category"].items()]
        for label, v in subs:
            lines.append(f"{'':<28} {label[:18]:<18} {100 * v['accuracy']:>7.2f}% {v['correct']:>8} {v['total']:>6}")
    o = rep["overall"]
    lines.append("-" * len(header))
    lines.append(f"{'overall (micro)':<28} {'':<18} {100 * o['accuracy']:>7.2f}% {o['correct']:>8} {o['total']:>6}")
    lines.append(f"{'overall (macro)':<28} {'':<18} {100 * o['macro_accuracy']:>7.2f}%")
    return "\n".join(lines)


def report_metrics(rep: dict) -> dict[str, float]:
    """Flat metrics for metrics.jsonl: eval/<benchmark>/accuracy and eval/overall/accuracy."""
    out = {f"eval/{b}/accuracy": e["accuracy"] for b, e in rep["benchmarks"].items()}
    out["eval/overall/accuracy"] = rep["overall"]["accuracy"]
    return out


def write_report(rep: dict, results: Sequence[dict], out_dir: Union[str, Path], *,
                 tag: str = "eval") -> dict[str, Path]:
    """Write `<tag>_report.json` and `<tag>_wrong.jsonl` (the wrong items, for inspection)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / f"{tag}_report.json", "wrong": out / f"{tag}_wrong.jsonl"}
    paths["report"].write_text(json.dumps(rep, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(paths["wrong"], "w", encoding="utf-8") as f:
        for row in results:
            if not row["correct"]:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return paths
