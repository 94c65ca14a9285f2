"""The GPU run's plan and runner: the parts of bench/gpu.sh in order of value, each in its own budget.

    python bench/gpu_run.py [--quick] [--parts abcd] [--budget S] [--out DIR] [--dry-run]

bench/gpu.sh prepares the environment (wheels, the checkout on PYTHONPATH) and calls this. Parts:
(a) the `cuda`-marked tests (every CUDA path against the CPU); (b) kernel benchmarks at the 7B head;
(c) the stage-3 training step at the 7B widths (MFU, tokens/s/GPU); (d) the rest of the bench.
Each step is its own pytest process stopped by `timeout` at its budget (SIGINT, then SIGKILL), and
`-p gpu_rows` (bench/gpu_rows.py) writes every finished test and benchmark to a JSON-lines file as it
goes, so a step stopped at its budget keeps what finished. After every step the results so far go
to DIR: `bench.json` (all benchmarks, pytest-benchmark's format: `record.py` reads it), `summary.md`
and `results.tar.gz` (per-step rows, JSON and logs). At the end `record.py` folds the benchmarks into
bench/history.jsonl and bench/RESULTS.md (copied to DIR too) and one summary table is printed.

A step's budget is cut to what is left of the run's (`--budget`, default 470 s with --quick: the
device tool's 8-minute target; 570 s otherwise, under its 10-minute command limit), counted from
LINGSHU_GPU_START (set by gpu.sh) so the set-up counts too. `--dry-run` runs nothing: it prints the
plan and checks that every step's selection collects at least one test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))  # record.py, and gpu_rows.py for the pytest processes
from record import figures_text, record  # noqa: E402

HISTORY, RESULTS, PNG = BENCH_DIR / "history.jsonl", BENCH_DIR / "RESULTS.md", BENCH_DIR / "history.png"
QUICK_TOTAL_S, FULL_TOTAL_S = 470, 570
GRACE_S = 10  # between SIGINT and SIGKILL; inside the budget
FINISH_S = 15  # kept back at the end for recording and the summary
MIN_STEP_S = 20  # a step that would get less is not started


@dataclass(frozen=True)
class Step:
    part: str
    name: str
    what: str
    args: tuple  # pytest targets and selection
    quick_s: int  # budget under --quick; 0: not run then
    full_s: int
    quick_args: tuple = ()  # a narrower selection under --quick
    bench: bool = True


PLAN = (
    # budgets in seconds, (quick, full): --quick's add up to 445; with the 15 kept at the end, 460 of its 470
    Step("a", "cuda_tests", "cuda-marked tests: kernels, Liger, attention, images, generation",
         ("tests", "-m", "cuda", "--ignore", "tests/test_cuda_train.py"), 120, 200, bench=False),
    Step("a", "cuda_train", "cuda-marked tests: bf16 tiny-sft vs CPU, resume, NCCL (own processes)",
         ("tests/test_cuda_train.py", "-m", "cuda"), 85, 120, bench=False),
    Step("b", "flce", "fused linear CE vs Liger, CCE, torch, torch.compile (7B head)", ("bench/test_bench_flce.py",),
         70, 180, quick_args=("-k", "fwd_bwd")),
    Step("b", "grpo", "fused GRPO loss vs Liger and torch", ("bench/test_bench_grpo.py",), 30, 90),
    Step("b", "image_pack", "uint8 image pack GB/s", ("bench/test_bench_image_pack.py",), 25, 40,
         quick_args=("-k", "test_bench_pack and lingshu")),
    Step("c", "e2e_stage3", "stage-3 step at the 7B widths: MFU, tokens/s/GPU",
         ("bench/test_bench_e2e.py::test_bench_e2e_stage3[packed]",), 115, 180),
    Step("d", "attention", "varlen vs padded attention", ("bench/test_bench_attention.py",), 0, 60),
    Step("d", "e2e_rest", "stage 1, padded stage 3, packing gain, GRPO step (7B widths)",
         ("bench/test_bench_e2e.py", "--deselect", "bench/test_bench_e2e.py::test_bench_e2e_stage3[packed]"), 0, 300),
    Step("d", "planner", "packing planner and M-RoPE index (CPU code)", ("bench/test_bench_planner.py",), 0, 60),
)


@dataclass
class Outcome:
    step: Step
    budget_s: int
    status: str = "not run"
    wall_s: float = 0.0
    tests: dict = field(default_factory=dict)  # nodeid -> row of the worst phase
    benchmarks: list = field(default_factory=list)
    unfinished: str = ""  # the test that had started but not finished when the step ended

    def count(self, outcome: str) -> int:
        return sum(r["outcome"] == outcome for r in self.tests.values())


def selection(step: Step, quick: bool) -> list[str]:
    return [*step.args, *(step.quick_args if quick else ())]


def pytest_command(python: str, step: Step, quick: bool, work: Path) -> list[str]:
    cmd = [python, "-m", "pytest", *selection(step, quick), "-p", "gpu_rows", "-p", "no:cacheprovider", "-v", "-rfEs"]
    if step.bench:
        cmd += ["--benchmark", "--benchmark-json", str(work / f"{step.name}.json")]
    return cmd


def step_env(step: Step, work: Path) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", LINGSHU_KERNELS="auto", PYTHONUNBUFFERED="1",
               LINGSHU_ROWS=str(work / f"{step.name}.jsonl"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(BENCH_DIR)) if p)
    return env


def read_rows(path: Path) -> tuple[dict, list, str]:
    """(tests by nodeid, benchmark dicts, the last test started and never reported) from a gpu_rows
    file; a truncated last line is dropped."""
    tests, benchmarks, started, rank = {}, [], "", {"passed": 0, "skipped": 1, "failed": 2}
    if not path.exists():
        return tests, benchmarks, started
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "benchmark" in row:
            benchmarks.append(row["benchmark"])
        elif "start" in row:
            started = row["start"]
        elif "test" in row:
            old = tests.get(row["test"])
            if old is None or rank[row["outcome"]] > rank[old["outcome"]]:
                tests[row["test"]] = row
    return tests, benchmarks, (started if started and started not in tests else "")


def budgets(plan, quick: bool, parts: str) -> list[tuple[Step, int]]:
    """The steps to run with their own budgets (before the run's remaining time cuts them)."""
    chosen = []
    for step in plan:
        budget = step.quick_s if quick else step.full_s
        if step.part in parts and budget > 0:
            chosen.append((step, budget))
    return chosen


def run_step(python: str, step: Step, budget_s: int, quick: bool, work: Path) -> Outcome:
    out = Outcome(step, budget_s)
    cmd = ["timeout", "--signal=INT", f"--kill-after={GRACE_S}", str(budget_s - GRACE_S),
           *pytest_command(python, step, quick, work)]
    print(f"\n=== part ({step.part}) {step.name}: budget {budget_s} s: {' '.join(cmd[4:])}", flush=True)
    start = time.monotonic()
    with open(work / f"{step.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=step_env(step, work), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        rc = proc.wait()
    out.wall_s = time.monotonic() - start
    out.tests, out.benchmarks, out.unfinished = read_rows(work / f"{step.name}.jsonl")
    official = work / f"{step.name}.json"
    if official.exists():  # the complete file when the step ended by itself
        try:
            out.benchmarks = json.loads(official.read_text())["benchmarks"]
        except (ValueError, KeyError):
            pass
    if rc in (124, 137) or (rc != 0 and out.wall_s >= budget_s - GRACE_S - 1):
        out.status = "timed out"
    elif rc == 0:
        out.status = "passed"
    else:
        out.status = f"failed (rc {rc})"
    return out


def bench_document(outcomes: list[Outcome], started: str) -> dict:
    """All benchmarks so far as one pytest-benchmark JSON document (what record.py reads)."""
    return {"machine_info": {}, "commit_info": {}, "datetime": started,
            "benchmarks": [b for o in outcomes for b in o.benchmarks]}


def summary(outcomes: list[Outcome], device: str) -> str:
    lines = [f"## GPU run on {device}", "",
             "| part | step | budget | wall | status | passed | failed | skipped | benchmarks |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        lines.append(f"| {o.step.part} | {o.step.name} | {o.budget_s} s | {o.wall_s:.0f} s | {o.status} | "
                     f"{o.count('passed')} | {o.count('failed')} | {o.count('skipped')} | {len(o.benchmarks)} |")
    figures = [(b.get("fullname", b.get("name", "?")), b) for o in outcomes for b in o.benchmarks]
    if figures:
        lines += ["", "| benchmark | best | mean | figures |", "| --- | --- | --- | --- |"]
        for name, b in figures:
            stats = b.get("stats") or {}
            best, mean = stats.get("min"), stats.get("mean")
            lines.append(f"| `{name.split('::')[-1]}` | {_ms(best)} | {_ms(mean)} | "
                         f"{figures_text(b.get('extra_info') or {})} |")
    unfinished = [f"- {o.step.name} ({o.status}): in `{o.unfinished}`" for o in outcomes if o.unfinished]
    if unfinished:
        lines += ["", "Stopped inside a test:"] + unfinished
    failed = [(o.step.name, r) for o in outcomes for r in o.tests.values() if r["outcome"] == "failed"]
    if failed:
        lines += ["", "Failures:"]
        lines += [f"- {step}: `{r['test']}`: {r['message'].strip().splitlines()[-1] if r['message'].strip() else '?'}"
                  for step, r in failed]
    reasons: dict = {}
    for o in outcomes:
        for r in o.tests.values():
            if r["outcome"] == "skipped":
                reasons[r["message"]] = reasons.get(r["message"], 0) + 1
    if reasons:
        lines += ["", "Skips:"] + [f"- {n} x {reason}" for reason, n in sorted(reasons.items(), key=lambda x: -x[1])]
    return "\n".join(lines) + "\n"


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f} ms"


def save_results(outcomes: list[Outcome], work: Path, out_dir: Optional[Path], started: str, device: str) -> Path:
    """bench.json and summary.md into the work folder and, with --out, DIR (plus results.tar.gz)."""
    doc = work / "bench.json"
    doc.write_text(json.dumps(bench_document(outcomes, started)))
    (work / "summary.md").write_text(summary(outcomes, device))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("bench.json", "summary.md"):
            (out_dir / name).write_bytes((work / name).read_bytes())
        with tarfile.open(out_dir / "results.tar.gz", "w:gz") as tar:
            for path in sorted(work.iterdir()):
                tar.add(path, arcname=f"gpu_results/{path.name}")
    return doc


def finish(outcomes: list[Outcome], doc: Path, out_dir: Optional[Path], python: str) -> int:
    """record.py (history.jsonl, RESULTS.md) and plot.py when there are figures; copies to DIR."""
    status = 0
    if any(o.benchmarks for o in outcomes):
        record([doc], HISTORY, RESULTS)
        print(f"gpu_run: recorded {sum(len(o.benchmarks) for o in outcomes)} benchmark rows in {HISTORY} and {RESULTS}")
        plot = [python, str(BENCH_DIR / "plot.py"), "--history", str(HISTORY), "--out", str(PNG)]
        plotted = subprocess.run(plot, cwd=ROOT).returncode == 0  # needs matplotlib: a figure, not a result
        if out_dir is not None:
            for path in (HISTORY, RESULTS) + ((PNG,) if plotted else ()):
                (out_dir / path.name).write_bytes(path.read_bytes())
    for o in outcomes:
        if o.status != "passed" or o.count("failed"):
            status = 1
    return status


def device_name(python: str) -> str:
    probe = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return out.stdout.strip() or "unknown device"


def collect_count(python: str, step: Step, quick: bool, work: Path) -> tuple[int, str]:
    """(number of tests the step's selection collects, pytest's output tail) without running them."""
    cmd = [python, "-m", "pytest", *selection(step, quick), "-p", "gpu_rows", "-p", "no:cacheprovider",
           "--collect-only", "-q"] + (["--benchmark"] if step.bench else [])
    proc = subprocess.run(cmd, cwd=ROOT, env=step_env(step, work), capture_output=True, text=True)
    items = [line for line in proc.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return (len(items) if proc.returncode == 0 else -1), "\n".join(tail)


def dry_run(python: str, quick: bool, parts: str, total_s: float, work: Path) -> int:
    """Print the plan with its budgets; check that every step's selection collects tests."""
    steps = budgets(PLAN, quick, parts)
    print(f"gpu_run: the plan ({'--quick' if quick else 'full'}; the run's budget {total_s:.0f} s, "
          f"{FINISH_S} s of it kept for recording):")
    print("| part | step | budget quick | budget full | what | selection |")
    print("| --- | --- | --- | --- | --- | --- |")
    for step in PLAN:
        print(f"| {step.part} | {step.name} | {step.quick_s or '-'} s | {step.full_s} s | {step.what} | "
              f"`{' '.join(selection(step, quick))}` |")
    planned = sum(b for _, b in steps)
    print(f"gpu_run: chosen steps' budgets add up to {planned} s (steps past the run's budget are cut or left out)")
    failures = 0
    for step, _ in steps:
        variants = [quick] if not step.quick_args else [True, False]
        for variant in variants:
            n, tail = collect_count(python, step, variant, work)
            label = f"{step.name}{' (--quick)' if variant and step.quick_args else ''}"
            if n <= 0:
                failures += 1
                print(f"gpu_run: FAIL {label}: {'no test selected' if n == 0 else 'collection failed'}:\n{tail}")
            else:
                print(f"gpu_run: ok   {label}: {n} tests collect")
    print(f"gpu_run: dry run {'failed' if failures else 'passed'}")
    return 1 if failures else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short selection, within 470 s in all")
    parser.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'ab' or 'd' (default abcd)")
    parser.add_argument("--budget", type=float, default=None, help="the run's total seconds (default 470 / 570)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results here (the device tool's $OUT)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the per-step files (default: a temp dir)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check that every step collects")
    args = parser.parse_args(argv)
    if set(args.parts) - set("abcd") or not args.parts:
        parser.error(f"--parts {args.parts!r}: use letters of 'abcd'")
    python = sys.executable
    total_s = args.budget or (QUICK_TOTAL_S if args.quick else FULL_TOTAL_S)
    start = float(os.environ.get("LINGSHU_GPU_START", time.time()))
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"lingshu_gpu_run.{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        return dry_run(python, args.quick, args.parts, total_s, work)
    device = device_name(python)
    started = datetime.now(timezone.utc).isoformat()
    outcomes: list[Outcome] = []
    doc = work / "bench.json"
    for step, budget in budgets(PLAN, args.quick, args.parts):
        left = int(total_s - (time.time() - start) - FINISH_S)
        if min(budget, left) < MIN_STEP_S:
            outcomes.append(Outcome(step, min(budget, max(left, 0)), status="not run (no time left)"))
            continue
        outcomes.append(run_step(python, step, min(budget, left), args.quick, work))
        doc = save_results(outcomes, work, args.out, started, device)
    doc = save_results(outcomes, work, args.out, started, device)
    status = finish(outcomes, doc, args.out, python)
    print("\n" + summary(outcomes, device))
    print(f"gpu_run: {time.time() - start:.0f} s in all; per-step files in {work}"
          + (f"; results in {args.out}" if args.out else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
