"""Eval reports: per-benchmark accuracy (overall, per task, per category), the printed table with
Lingshu-7B's published figure beside each benchmark (`eval.reported`), the files written next to
them, and the flat metrics rows for metrics.jsonl.

`report(results)` -> per-benchmark accuracy and counts; `format_table` prints it; `write_report`
saves `<tag>_report.json` and the wrong items as `<tag>_wrong.jsonl` for inspection;
`report_metrics` gives the `eval/<benchmark>/accuracy` rows.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence, Union

from lingshu_fast.eval.reported import SOURCE, reported_accuracy


def _acc(correct: int, total: int) -> dict:
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}


def report(results: Sequence[dict]) -> dict:
    """results: rows with `benchmark`, `task`, `correct` (and optional `category`, `scoring`) ->
    {"benchmarks": {name: {accuracy, correct, total, by_task: {...}, by_category: {...},
                           lingshu_7b_reported (percent or None)}},
     "overall": {accuracy (micro over items), macro_accuracy (mean over benchmarks), correct, total},
     "scoring": the rows' scoring mode when they share one}."""
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
    for bench, entry in benchmarks.items():
        entry["lingshu_7b_reported"] = reported_accuracy(bench)
    modes = {row.get("scoring") for row in results}
    return {"benchmarks": benchmarks, "overall": overall, "scoring": modes.pop() if len(modes) == 1 else None}


def format_table(rep: dict) -> str:
    """A fixed-width table: one row per benchmark and task/category, Lingshu-7B's published accuracy
    beside each benchmark the paper reports ("-" otherwise), then the overall lines and the source."""
    header = (f"{'benchmark':<28} {'split':<18} {'accuracy':>8} {'correct':>8} {'total':>6} "
              f"{'Lingshu-7B':>10}")
    lines = [header, "-" * len(header)]
    for bench, e in rep["benchmarks"].items():
        paper = reported_accuracy(bench)
        paper_text = "-" if paper is None else f"{paper:.1f}%"
        lines.append(f"{bench:<28} {'all':<18} {100 * e['accuracy']:>7.2f}% {e['correct']:>8} {e['total']:>6} "
                     f"{paper_text:>10}")
        subs = [(f"task={k}", v) for k, v in e["by_task"].items()] if len(e["by_task"]) > 1 else []
        subs += [(f"{k}", v) for k, v in e["by_category"].items()]
        for label, v in subs:
            lines.append(f"{'':<28} {label[:18]:<18} {100 * v['accuracy']:>7.2f}% {v['correct']:>8} {v['total']:>6}")
    o = rep["overall"]
    lines.append("-" * len(header))
    lines.append(f"{'overall (micro)':<28} {'':<18} {100 * o['accuracy']:>7.2f}% {o['correct']:>8} {o['total']:>6}")
    lines.append(f"{'overall (macro)':<28} {'':<18} {100 * o['macro_accuracy']:>7.2f}%")
    scoring = rep.get("scoring")
    lines.append(f"scoring: {scoring or '?'}; Lingshu-7B column: {SOURCE}"
                 + ("" if scoring in (None, "medevalkit") else " (scored by MedEvalKit's rules, not these)"))
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
