"""Keep benchmark figures: pytest-benchmark JSON -> bench/history.jsonl -> bench/RESULTS.md.

    python bench/record.py RUN.json [MORE.json ...] [--history bench/history.jsonl] [--results bench/RESULTS.md]

Each benchmark of each JSON (`pytest bench/ --benchmark --benchmark-json RUN.json`) becomes one line
of history.jsonl: commit, date, machine, device kind, torch version, benchmark name, min / median /
mean time in seconds, rounds, and its figures (`extra_info` minus the machine fields). Lines are only
ever appended, so the file is the record across commits (bench/plot.py draws it).

RESULTS.md keeps, per machine, a section between `<!-- machine: NAME -->` and
`<!-- end machine: NAME -->` holding the latest row of every benchmark that machine has run, with
the commit and date of each. Only the sections of machines in this run are rewritten; any other text
(the introduction, the GPU targets, other machines) is left as it is. A machine is the device name
(the CUDA card, else the CPU model) with its core count for CPUs.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Iterable, Optional

BENCH_DIR = Path(__file__).resolve().parent
MACHINE_FIELDS = ("commit", "cpu_cores", "python", "torch", "device", "device_kind")
# Figures shown in RESULTS.md, in this order, when a benchmark has them (all stay in history.jsonl).
SHOWN = ("shape", "provider", "layout", "pass_", "pass_name", "resolved_backend", "out_dtype",
         "tokens_per_s_per_gpu", "mfu", "achieved_tflops", "scaled_tokens_per_s_per_gpu", "scaled_mfu",
         "per_layer_ms", "packing_gain", "padded_tokens_per_s_per_gpu", "slot_efficiency", "packing_efficiency",
         "padded_efficiency", "speedup", "pair_efficiency", "per_sample_us", "gb_per_s",
         "fraction_of_copy_bandwidth", "peak_growth_mib", "peak_vs_materialised", "peak_mem_gb", "llm_layers",
         "overlap_speedup", "step_overlapped_s", "step_after_backward_s", "bytes_per_param",
         "measured_over_predicted", "tokens", "records", "records_per_s", "mb_per_s", "scan_threads", "counter",
         "wall_s", "rss_growth_mb", "scaled", "scaled_wall_s", "scaled_rss_growth_mb", "images_per_s_per_core")


class RecordError(ValueError):
    """A JSON that is not pytest-benchmark output, or a RESULTS.md with broken section markers."""


def _machine_block(doc: dict) -> dict:
    info = doc.get("machine_info", {})
    return {k[len("lingshu_"):]: v for k, v in info.items() if k.startswith("lingshu_")}


def machine_name(device: str, device_kind: str, cores) -> str:
    return f"{device} ({cores} cores)" if device_kind == "cpu" and cores else device


def rows_from_json(doc: dict) -> list[dict]:
    """history.jsonl rows of one pytest-benchmark JSON document."""
    if "benchmarks" not in doc:
        raise RecordError("not a pytest-benchmark JSON (no 'benchmarks' list): write it with --benchmark-json FILE")
    run = _machine_block(doc)
    cpu = doc.get("machine_info", {}).get("cpu", {})
    commit_info = doc.get("commit_info", {})
    rows = []
    for bench in doc["benchmarks"]:
        extra = dict(bench.get("extra_info") or {})
        field = lambda key, default=None: extra.get(key, run.get(key, default))  # noqa: E731
        device = field("device") or cpu.get("brand_raw") or "unknown device"
        kind = field("device_kind", "cpu")
        commit = field("commit") or (commit_info.get("id") or "unknown")[:7]
        stats = bench.get("stats", {})
        rows.append({
            "commit": commit, "date": doc.get("datetime", ""),
            "machine": machine_name(device, kind, field("cpu_cores") or cpu.get("count")),
            "device_kind": kind, "torch": field("torch"), "name": bench.get("fullname", bench.get("name")),
            "min_s": stats.get("min"), "median_s": stats.get("median"), "mean_s": stats.get("mean"),
            "rounds": stats.get("rounds"),
            "figures": {k: v for k, v in extra.items() if k not in MACHINE_FIELDS},
        })
    return rows


def append_history(rows: Iterable[dict], history: Path) -> int:
    rows = list(rows)
    history.parent.mkdir(parents=True, exist_ok=True)
    with open(history, "a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")
    return len(rows)


def read_history(history: Path) -> list[dict]:
    if not history.exists():
        return []
    rows = []
    for number, line in enumerate(history.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise RecordError(f"{history}:{number}: not JSON ({err}); fix or delete that line") from None
    return rows


def latest_per_benchmark(rows: list[dict], machine: str) -> list[dict]:
    """The newest row (by date, then file order) of each benchmark name run on `machine`."""
    latest: dict[str, dict] = {}
    for row in rows:
        if row["machine"] == machine and (row["name"] not in latest or row["date"] >= latest[row["name"]]["date"]):
            latest[row["name"]] = row
    return [latest[name] for name in sorted(latest)]


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.3f} s"
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def _fmt_value(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def figures_text(figures: dict) -> str:
    shown = [f"{k}={_fmt_value(figures[k])}" for k in SHOWN if figures.get(k) is not None]
    return ", ".join(shown) if shown else "-"


def machine_section(machine: str, rows: list[dict]) -> str:
    kinds = sorted({r["device_kind"] for r in rows})
    torches = sorted({str(r.get("torch")) for r in rows})
    commits = sorted({r["commit"] for r in rows})
    dates = sorted(r["date"] for r in rows)
    lines = [
        f"<!-- machine: {machine} -->",
        f"### {machine}",
        "",
        f"Device kind {', '.join(kinds)}; torch {', '.join(torches)}; commit(s) {', '.join(commits)}; "
        f"measured {dates[0][:19]} to {dates[-1][:19]} UTC. Times are per call (best / mean of the rounds).",
        "",
        "| benchmark | best | mean | figures | commit | date |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        name = r["name"].split("::")[-1]
        lines.append(f"| `{name}` | {_fmt_time(r['min_s'])} | {_fmt_time(r['mean_s'])} | "
                     f"{figures_text(r['figures'])} | {r['commit']} | {r['date'][:10]} |")
    lines.append(f"<!-- end machine: {machine} -->")
    return "\n".join(lines)


def update_results(results: Path, sections: dict[str, str]) -> None:
    """Replace each machine's marked section in `results` (append it under the measured-figures
    heading, or at the end, when the machine is new)."""
    text = results.read_text() if results.exists() else "# Benchmark results\n\n## Measured figures\n"
    for machine, section in sections.items():
        start, end = f"<!-- machine: {machine} -->", f"<!-- end machine: {machine} -->"
        if text.count(start) != text.count(end) or text.count(start) > 1:
            raise RecordError(f"{results}: the markers of machine {machine!r} are unbalanced or repeated; "
                              f"fix them by hand (each section runs from '{start}' to '{end}')")
        if start in text:
            pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
            text = pattern.sub(lambda _: section, text, count=1)
        else:
            anchor = "## Measured figures\n"
            if anchor in text:
                head, tail = text.split(anchor, 1)
                text = head + anchor + "\n" + section + "\n" + tail
            else:
                text = text.rstrip("\n") + "\n\n" + section + "\n"
    results.write_text(text)


def record(json_paths: list[Path], history: Path, results: Path) -> list[dict]:
    new_rows = []
    for path in json_paths:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise RecordError(f"{path}: cannot read a pytest-benchmark JSON ({err})") from None
        new_rows += rows_from_json(doc)
    append_history(new_rows, history)
    everything = read_history(history)
    machines = sorted({r["machine"] for r in new_rows})
    update_results(results, {m: machine_section(m, latest_per_benchmark(everything, m)) for m in machines})
    return new_rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--history", type=Path, default=BENCH_DIR / "history.jsonl")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS.md")
    args = parser.parse_args(argv)
    try:
        rows = record(args.json, args.history, args.results)
    except RecordError as err:
        print(f"record.py: {err}", file=sys.stderr)
        return 2
    print(f"record.py: {len(rows)} benchmark rows appended to {args.history}; {args.results} updated for "
          f"{', '.join(sorted({r['machine'] for r in rows}))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
