"""bench/record.py and bench/plot.py on a small fake pytest-benchmark JSON (fast, no benchmark runs)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import plot
import pytest
import record

BENCH = Path(__file__).resolve().parents[1] / "bench"




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


def _single(n_tokens: int, sample_id: int, with_image: bool):
    import torch

    from lingshu_fast.data.batch import MicroBatch

    labels = torch.arange(n_tokens) + 100
    labels[-1] = -100  # shifted labels end each sample with -100
    mb = MicroBatch(input_ids=torch.arange(n_tokens) + 10, labels=labels,
                    position_ids=torch.arange(n_tokens).expand(3, n_tokens).clone(),
                    cu_seqlens=torch.tensor([0, n_tokens], dtype=torch.int32), max_seqlen=n_tokens,
                    num_label_tokens=n_tokens - 1, sample_ids=[sample_id], num_samples=1)
    if with_image:
        mb.pixel_values, mb.image_grid_thw = torch.full((16, 1176), float(sample_id)), torch.tensor([[1, 4, 4]])
    return mb


def test_padded_baseline_groups_within_budget_and_pads_inside_segments():
    """Pins the e2e bench's padded baseline (bench/test_bench_e2e.py docstring): consecutive samples
    grouped while count x longest <= budget; each sample padded at its end inside its own segment
    with labels -100 (so padding adds compute but no loss terms); real tokens, labels and images kept."""
    import torch

    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH / "test_bench_e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = e2e
    spec.loader.exec_module(e2e)
    lengths = [10, 30, 20, 50, 5, 5]
    singles = [_single(n, i, with_image=i % 2 == 0) for i, n in enumerate(lengths)]
    batches = e2e.padded_batches(singles, budget=64, pad_id=0)
    # [10, 30] -> 2x30=60; +20 stays 3x30=90 > 64 -> new; [20] +50 -> 100 > 64 -> new; [50]; [5, 5]
    assert [mb.sample_ids for mb in batches] == [[0, 1], [2], [3], [4, 5]]
    first = batches[0]
    assert first.cu_seqlens.tolist() == [0, 30, 60] and first.max_seqlen == 30 and first.num_tokens == 60
    assert torch.equal(first.input_ids[:10], singles[0].input_ids) and (first.input_ids[10:30] == 0).all()
    assert (first.labels[9:30] == -100).all() and first.num_label_tokens == 9 + 29
    assert int((first.labels != -100).sum()) == first.num_label_tokens
    assert first.pixel_values.shape == (16, 1176) and first.vit_cu_seqlens.tolist() == [0, 16]
    assert sum(mb.num_tokens for mb in batches) == 60 + 20 + 50 + 10
