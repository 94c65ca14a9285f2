"""bench/record.py and bench/plot.py on a small fake pytest-benchmark JSON (fast, no benchmark runs)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:  # plot.py imports record as a sibling module
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


record = _load("record")
plot = _load("plot")


def fake_run(commit: str, date: str, device: str = "Fake CPU 9000", kind: str = "cpu", tokens_per_s: float = 1000.0,
             kernel_s: float = 0.002) -> dict:
    machine = dict(commit=commit, cpu_cores=2, python="3.11.7", torch="2.13.0", device=device, device_kind=kind)
    return {
        "machine_info": {"cpu": {"brand_raw": "ignored"}, **{f"lingshu_{k}": v for k, v in machine.items()}},
        "commit_info": {"id": "f" * 40},
        "datetime": date,
        "benchmarks": [
            {"name": "test_bench_e2e_stage3[packed]", "fullname": "bench/test_bench_e2e.py::test_bench_e2e_stage3[packed]",
             "stats": {"min": 0.5, "median": 0.55, "mean": 0.6, "rounds": 3},
             "extra_info": {**machine, "tokens_per_s_per_gpu": tokens_per_s, "mfu": None, "layout": "packed"}},
            {"name": "test_bench_flce[lingshu-fwd]", "fullname": "bench/test_bench_flce.py::test_bench_flce[lingshu-fwd]",
             "stats": {"min": kernel_s, "median": kernel_s, "mean": kernel_s * 1.1, "rounds": 5},
             "extra_info": {**machine, "provider": "lingshu", "peak_mem_mb": 12.5}},
        ],
    }


def write(tmp_path: Path, name: str, doc: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


INTRO = "# Benchmark results\n\nIntro kept.\n\n## Measured figures\n\n## GPU targets\n\n- stage 3 >= 50% MFU: not yet measured\n"


def test_record_appends_history_and_rewrites_only_its_machine(tmp_path):
    """Pins: one history line per benchmark with the figures and without the machine fields; a
    second run of the same machine replaces its section (no duplicate) with the newest figures,
    another machine's section and the hand-written text stay untouched."""
    history, results = tmp_path / "history.jsonl", tmp_path / "RESULTS.md"
    results.write_text(INTRO)
    record.record([write(tmp_path, "a.json", fake_run("aaa1111", "2026-01-01T00:00:00"))], history, results)
    record.record([write(tmp_path, "g.json", fake_run("aaa1111", "2026-01-01T01:00:00", device="NVIDIA H100 80GB HBM3",
                                                      kind="cuda", tokens_per_s=9e4))], history, results)
    record.record([write(tmp_path, "b.json", fake_run("bbb2222", "2026-01-02T00:00:00", tokens_per_s=2000.0))],
                  history, results)
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    assert len(rows) == 6
    assert rows[0]["machine"] == "Fake CPU 9000 (2 cores)" and rows[0]["commit"] == "aaa1111"
    assert rows[0]["figures"] == {"tokens_per_s_per_gpu": 1000.0, "mfu": None, "layout": "packed"}
    assert rows[2]["machine"] == "NVIDIA H100 80GB HBM3"
    assert rows[1]["min_s"] == 0.002 and rows[1]["mean_s"] == pytest.approx(0.0022)
    text = results.read_text()
    assert text.count("<!-- machine: Fake CPU 9000 (2 cores) -->") == 1
    assert text.count("<!-- machine: NVIDIA H100 80GB HBM3 -->") == 1
    cpu = text.split("<!-- machine: Fake CPU 9000 (2 cores) -->")[1].split("<!-- end machine")[0]
    assert "tokens_per_s_per_gpu=2,000" in cpu and "bbb2222" in cpu and "aaa1111" not in cpu
    assert "tokens_per_s_per_gpu=90,000" in text
    assert text.startswith("# Benchmark results\n\nIntro kept.") and "- stage 3 >= 50% MFU: not yet measured" in text


def test_record_rejects_other_json_and_broken_markers(tmp_path):
    """Pins the two user errors: a JSON that is not pytest-benchmark's, and a RESULTS.md whose
    markers were half deleted (rewriting it would eat the rest of the file)."""
    with pytest.raises(record.RecordError, match="--benchmark-json"):
        record.rows_from_json({"foo": 1})
    results = tmp_path / "RESULTS.md"
    results.write_text("<!-- machine: Fake CPU 9000 (2 cores) -->\nhalf a section\n")
    code = record.main([str(write(tmp_path, "a.json", fake_run("a", "2026-01-01T00:00:00"))),
                        "--history", str(tmp_path / "h.jsonl"), "--results", str(results)])
    assert code == 2 and results.read_text() == "<!-- machine: Fake CPU 9000 (2 cores) -->\nhalf a section\n"


def test_plot_series_orders_commits_and_splits_throughput_from_times(tmp_path):
    """Pins: commits on the x axis in first-measured order (not alphabetical), throughput rows
    apart from timing rows, the latest figure of a re-measured commit, and a PNG written."""
    runs = [fake_run("zzz", "2026-01-01T00:00:00", tokens_per_s=100.0, kernel_s=0.004),
            fake_run("aaa", "2026-01-02T00:00:00", tokens_per_s=200.0, kernel_s=0.002),
            fake_run("aaa", "2026-01-03T00:00:00", tokens_per_s=250.0, kernel_s=0.001)]
    rows = [row for doc in runs for row in record.rows_from_json(doc)]
    commits, throughput, times = plot.series(rows, "Fake CPU 9000 (2 cores)")
    assert commits == ["zzz", "aaa"]
    assert throughput == {"test_bench_e2e_stage3[packed]": {"zzz": 100.0, "aaa": 250.0}}
    assert times == {"test_bench_flce[lingshu-fwd]": {"zzz": pytest.approx(4.0), "aaa": pytest.approx(1.0)}}
    out = plot.plot(rows, tmp_path / "h.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
