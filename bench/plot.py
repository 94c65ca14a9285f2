"""Plot bench/history.jsonl across commits: end-to-end tokens/s/GPU and kernel times, per machine.

    python bench/plot.py [--history bench/history.jsonl] [--out bench/history.png] [--machine NAME]

Two panels per machine (one row each): left, `tokens_per_s_per_gpu` of every benchmark that reports
it (the end-to-end steps); right, the best time in ms of every other benchmark (kernels, data path),
log scale. The x axis is the commits in the order they were first measured on that machine; a
commit measured several times shows its latest figure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # for `record` when run as a script from anywhere
from record import RecordError, read_history  # noqa: E402

THROUGHPUT = "tokens_per_s_per_gpu"


def commit_order(rows: list[dict]) -> list[str]:
    """Commits by the date each was first measured."""
    first: dict[str, str] = {}
    for row in rows:
        if row["commit"] not in first or row["date"] < first[row["commit"]]:
            first[row["commit"]] = row["date"]
    return sorted(first, key=lambda c: (first[c], c))


def series(rows: list[dict], machine: str) -> tuple[list[str], dict[str, dict], dict[str, dict]]:
    """(commits, throughput {name: {commit: tokens/s}}, times {name: {commit: best ms}}) of `machine`;
    the latest row wins when a commit was measured more than once."""
    mine = sorted((r for r in rows if r["machine"] == machine), key=lambda r: r["date"])
    throughput: dict[str, dict] = {}
    times: dict[str, dict] = {}
    for r in mine:
        name = r["name"].split("::")[-1]
        value = (r.get("figures") or {}).get(THROUGHPUT)
        if value is not None:
            throughput.setdefault(name, {})[r["commit"]] = float(value)
        elif r.get("min_s") is not None:
            times.setdefault(name, {})[r["commit"]] = float(r["min_s"]) * 1e3
    return commit_order(mine), throughput, times


def plot(rows: list[dict], out: Path, machines: Optional[list[str]] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machines = machines or sorted({r["machine"] for r in rows})
    if not machines:
        raise RecordError("no benchmark rows to plot: run bench/record.py on a --benchmark-json file first")
    fig, axes = plt.subplots(len(machines), 2, figsize=(22, 6 * len(machines)), squeeze=False)
    for (ax_tp, ax_t), machine in zip(axes, machines):
        commits, throughput, times = series(rows, machine)
        x = {c: i for i, c in enumerate(commits)}
        for ax, data, ylabel in ((ax_tp, throughput, "tokens/s/GPU"), (ax_t, times, "best time (ms)")):
            for name, points in sorted(data.items()):
                ordered = sorted(points, key=x.get)
                ax.plot([x[c] for c in ordered], [points[c] for c in ordered], marker="o", label=name)
            ax.set_xticks(range(len(commits)), commits, rotation=45, ha="right")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if data:  # beside the axes: a kernel panel has dozens of rows
                ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax_tp.set_title(f"{machine}: end-to-end throughput")
        ax_t.set_title(f"{machine}: kernel and data-path times")
        ax_t.set_yscale("log")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=Path, default=BENCH_DIR / "history.jsonl")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "history.png")
    parser.add_argument("--machine", action="append", help="only this machine (repeatable); default all")
    args = parser.parse_args(argv)
    try:
        path = plot(read_history(args.history), args.out, args.machine)
    except RecordError as err:
        print(f"plot.py: {err}", file=sys.stderr)
        return 2
    print(f"plot.py: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
