"""bench/gpu_run.py (the GPU run's plan and runner) and bench/gpu_rows.py, on the CPU.

The runner's promise is that a step stopped at its budget keeps what finished: pinned here with a
real pytest process (a fast benchmark, then one that sleeps past the budget) under the same
`timeout --signal=INT` the GPU run uses.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import gpu_run
import pytest
import record

BENCH = Path(__file__).resolve().parents[1] / "bench"
ROOT = BENCH.parent




def test_plan_is_ordered_by_value_and_quick_fits_its_budget():
    """Pins the issue's order (a: cuda tests, b: kernel benches, c: the 7B stage-3 step, d: the rest),
    every target existing, and --quick's budgets plus the time kept for recording inside 470 s."""
    parts = [s.part for s in gpu_run.PLAN]
    assert parts == sorted(parts) and set(parts) == set("abcd")
    assert len({s.name for s in gpu_run.PLAN}) == len(gpu_run.PLAN)
    for step in gpu_run.PLAN:
        target = step.args[0].split("::")[0]
        assert (ROOT / target).exists(), target
        assert step.full_s >= step.quick_s and (step.quick_s == 0 or step.quick_s >= gpu_run.MIN_STEP_S)
    quick = sum(b for _, b in gpu_run.budgets(gpu_run.PLAN, True, "abcd"))
    assert quick + gpu_run.FINISH_S <= gpu_run.QUICK_TOTAL_S < 480
    assert gpu_run.FULL_TOTAL_S < 600  # the device tool stops a command at 10 minutes
    assert [s.name for s, _ in gpu_run.budgets(gpu_run.PLAN, True, "a")] == ["cuda_tests", "cuda_train"]
    assert not gpu_run.budgets(gpu_run.PLAN, True, "d")  # part d runs only in a full run or --parts d


def test_read_rows_keeps_the_worst_phase_and_drops_a_torn_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    lines = [{"test": "t::a", "outcome": "passed", "when": "call", "duration_s": 1, "message": ""},
             {"test": "t::a", "outcome": "failed", "when": "teardown", "duration_s": 0, "message": "boom"},
             {"test": "t::b", "outcome": "skipped", "when": "setup", "duration_s": 0, "message": "no GPU"},
             {"benchmark": {"name": "t::a", "stats": {"min": 1.0}}, "datetime": "2026-01-01T00:00:00"}]
    rows.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"start": "t::c"}\n{"test": "t::c", "outc')
    tests, benchmarks, unfinished = gpu_run.read_rows(rows)
    assert {k: v["outcome"] for k, v in tests.items()} == {"t::a": "failed", "t::b": "skipped"}
    assert benchmarks == [{"name": "t::a", "stats": {"min": 1.0}}]
    assert unfinished == "t::c"


_FAKE_TESTS = '''
import time

def test_fast(benchmark):
    benchmark.extra_info.update(device="Fake GPU", device_kind="cuda", tokens_per_s_per_gpu=123.0)
    benchmark.pedantic(lambda: None, rounds=2)

def test_skipped():
    import pytest
    pytest.skip("nothing to see")

def test_past_the_budget(benchmark):
    benchmark.pedantic(lambda: time.sleep(120), rounds=1)
'''

_FAKE_CONFTEST = '''
def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true")
'''


@pytest.mark.slow
def test_a_step_stopped_at_its_budget_keeps_what_finished(tmp_path, monkeypatch):
    """A real pytest process: the fast benchmark and the skip are recorded, the sleeping one is
    interrupted by the budget, the step reads 'timed out', and bench.json / summary.md / the tarball
    hold the finished row in the form record.py reads (pytest-benchmark itself writes nothing then)."""
    pytest.importorskip("pytest_benchmark")
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_fake.py").write_text(textwrap.dedent(_FAKE_TESTS))
    (suite / "conftest.py").write_text(textwrap.dedent(_FAKE_CONFTEST))
    monkeypatch.setattr(gpu_run, "GRACE_S", 3)
    # 12 s: the inner pytest reaches the sleeping test ~1.5 s after it starts on the 2-core machine
    step = gpu_run.Step("b", "fake", "a fake bench", (str(suite / "test_fake.py"),), 12, 12)
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    outcome = gpu_run.run_step(sys.executable, step, 12, False, work)
    assert outcome.status == "timed out"
    assert outcome.count("passed") == 1 and outcome.count("skipped") == 1 and outcome.count("failed") == 0
    assert [b["name"] for b in outcome.benchmarks] == ["test_fast"]
    own = work / "fake.json"  # pytest-benchmark's own JSON: absent, or left empty by its crash on the interrupt
    assert not own.exists() or "test_fast" not in own.read_text()  # what the rows file is for
    assert outcome.unfinished.endswith("test_past_the_budget")
    doc = gpu_run.save_results([outcome], work, out, "2026-01-01T00:00:00+00:00", "Fake GPU")
    rows = record.rows_from_json(json.loads(doc.read_text()))
    assert rows[0]["machine"] == "Fake GPU" and rows[0]["figures"]["tokens_per_s_per_gpu"] == 123.0
    text = (out / "summary.md").read_text()
    assert "| b | fake | 12 s |" in text and "timed out" in text and "tokens_per_s_per_gpu=123" in text
    assert "1 x" in text and "nothing to see" in text and "in `" in text
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "results.tar.gz", "summary.md"]


def test_summary_lists_failures_and_not_run_steps():
    step = gpu_run.PLAN[0]
    ran = gpu_run.Outcome(step, 180, status="failed (rc 1)", wall_s=12.0, tests={
        "tests/x.py::test_a": {"test": "tests/x.py::test_a", "outcome": "failed", "message": "E  assert 1 == 2\n"},
        "tests/x.py::test_b": {"test": "tests/x.py::test_b", "outcome": "passed", "message": ""}})
    late = gpu_run.Outcome(gpu_run.PLAN[-1], 0, status="not run (no time left)")
    text = gpu_run.summary([ran, late], "NVIDIA H200")
    assert "| a | cuda_tests | 180 s | 12 s | failed (rc 1) | 1 | 1 | 0 | 0 |" in text
    assert "not run (no time left)" in text and "`tests/x.py::test_a`: E  assert 1 == 2" in text


def test_main_runs_the_plan_records_and_writes_out(tmp_path, monkeypatch, capsys):
    """The whole runner on a one-step plan that passes: exit 0, the benchmark recorded into the
    (temporary) history and RESULTS.md, every result file in --out, and the summary printed last."""
    pytest.importorskip("pytest_benchmark")
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_fake.py").write_text(textwrap.dedent(_FAKE_TESTS.split("def test_past_the_budget")[0]))
    (suite / "conftest.py").write_text(textwrap.dedent(_FAKE_CONFTEST))
    monkeypatch.setattr(gpu_run, "PLAN", (gpu_run.Step("b", "fake", "a fake bench", (str(suite),), 60, 60),))
    for name, file in (("HISTORY", "history.jsonl"), ("RESULTS", "RESULTS.md"), ("PNG", "history.png")):
        monkeypatch.setattr(gpu_run, name, tmp_path / file)
    out = tmp_path / "out"
    assert gpu_run.main(["--quick", "--budget", "120", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [(r["machine"], r["figures"]["tokens_per_s_per_gpu"]) for r in history] == [("Fake GPU", 123.0)]
    assert "<!-- machine: Fake GPU -->" in (tmp_path / "RESULTS.md").read_text()
    assert {"bench.json", "summary.md", "results.tar.gz", "history.jsonl", "RESULTS.md"} <= {p.name for p in out.iterdir()}
    printed = capsys.readouterr().out
    assert printed.rindex("| b | fake | 60 s |") > printed.rindex("=== part (b) fake")
