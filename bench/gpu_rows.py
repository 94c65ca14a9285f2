"""pytest plugin of the GPU run (`-p gpu_rows`, bench/ on sys.path): one JSON line per finished test.

pytest-benchmark writes its `--benchmark-json` only when the session ends, and a session stopped
by a timeout ends with an exception inside the plugin (the interrupted benchmark has no rounds), so
nothing is written. bench/gpu_run.py stops every part at its time budget; to keep what finished,
this plugin appends to the file named by LINGSHU_ROWS, as each test starts and finishes:
- `{"start": nodeid}` when a test starts;
- `{"test": nodeid, "outcome": "passed"|"failed"|"skipped", "duration_s", "message"}` (the
  message is the skip reason or the last lines of the failure);
- `{"benchmark": <pytest-benchmark's own per-benchmark dict>, "datetime": UTC ISO time}` for a
  test that ran a benchmark, the same dict `--benchmark-json` holds in its "benchmarks" list.
Without LINGSHU_ROWS it does nothing.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone

_MESSAGE_CHARS = 600


def _append(row: dict) -> None:
    path = os.environ.get("LINGSHU_ROWS")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])  # (file, line, "Skipped: reason")
    text = getattr(report, "longreprtext", "") or ""
    return text[-_MESSAGE_CHARS:]


def pytest_runtest_logstart(nodeid, location):
    _append({"start": nodeid})  # a step stopped at its budget names the test it was in


def pytest_runtest_logreport(report):
    # one row per test: its call, or the setup/teardown phase that decided it
    if report.when == "call" or (report.when != "call" and not report.passed):
        _append({"test": report.nodeid, "outcome": report.outcome, "when": report.when,
                 "duration_s": round(report.duration, 3), "message": _message(report) if not report.passed else ""})


def pytest_runtest_teardown(item, nextitem):
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(fixture, "stats", None)
    if not stats or getattr(fixture, "has_error", False):
        return
    _append({"benchmark": stats.as_dict(include_data=False),
             "datetime": datetime.now(timezone.utc).isoformat()})
