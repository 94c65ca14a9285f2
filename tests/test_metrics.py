"""Step metrics (lingshu_fast.train.metrics): peak table, MFU, metrics.jsonl, resume truncation."""
from __future__ import annotations

import json
import time

import pytest
import torch

from lingshu_fast.train.metrics import (
    MetricsWriter,
    SkipTracker,
    StepTimer,
    TrainingDiverged,
    mem_gb,
    mfu,
    peak_flops_per_s,
    peak_tflops_for_name,
    truncate_metrics,
)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0),
    ("NVIDIA H20", 148.0), ("Tesla T4", None),
])
def test_peak_table_matches_device_names(name, tflops):
    """Pins the substring order: 'H100 PCIe' must not fall through to the SXM figure, 'H200' must
    not match 'H20', 'L40S' not 'L40' or 'L4'; an unknown card gives None (MFU null), not a guess."""
    assert peak_tflops_for_name(name) == tflops


def test_mfu_and_cpu_peak():
    """Pins: MFU = FLOPs / (time x GPUs x peak); CPU has no peak, so MFU is None, not 0 or inf."""
    assert mfu(989e12 * 8 * 0.5, 1.0, 8, 989e12) == pytest.approx(0.5)
    assert mfu(1e12, 2.0, 1, None) is None and mfu(1e12, 0.0, 1, 1e12) is None
    assert peak_flops_per_s("cpu") is None
    if not torch.cuda.is_available():
        assert peak_flops_per_s() is None


def test_step_timer_and_mem():
    """Pins: the timer reports seconds (not ms) and mem_gb reports GiB of this process's peak RSS
    on CPU (a Python + torch process holds well over 10 MiB and, here, under 24 GiB)."""
    with StepTimer("cpu") as t:
        time.sleep(0.05)
    assert 0.04 < t.elapsed_s < 2.0
    assert 0.01 < mem_gb("cpu") < 24


def test_skip_tracker_stops_after_consecutive_skips():
    """Pins: skips are counted, a finite step resets the streak, and the N-th consecutive skip raises
    TrainingDiverged whose message names the count, the step and what to do."""
    tr = SkipTracker(3)
    tr.skip(1, "loss is nan")
    tr.skip(2, "loss is nan")
    tr.ok()
    tr.skip(4, "grad norm is inf")
    tr.skip(5, "grad norm is inf")
    expected = r"3 consecutive steps skipped .*step 6: loss is inf.*optim.lr"
    with pytest.raises(TrainingDiverged, match=expected):
        tr.skip(6, "loss is inf")
    assert tr.total == 5
    restored = SkipTracker(3)
    restored.load_state_dict(tr.state_dict())
    assert restored.total == 5 and restored.consecutive == 3


def _row(step, loss=1.0):
    return dict(step=step, loss=loss, lr=1e-5, grad_norm=0.5, tokens=100, tokens_per_s_per_gpu=1234.5,
                mfu=None, mem_gb=1.5, skipped_samples=0)


def test_writer_rows_nonfinite_and_other_ranks(tmp_path, capsys):
    """Pins: each step writes one strict-JSON line with the required fields plus extras (nan -> null,
    since NaN is not JSON), the progress bar shows the same figures, and ranks other than 0 write
    nothing."""
    with MetricsWriter(tmp_path, rank=0, stage=3, total_steps=3, progress=True) as w:
        w.log(**_row(1))
        w.log(**_row(2, loss=float("nan")), reward_mean=torch.tensor(0.25))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    required = {"stage", "step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s_per_gpu", "mfu",
                "mem_gb", "skipped_samples"}
    assert required <= set(rows[0]) and rows[0]["stage"] == 3
    assert rows[1]["loss"] is None and rows[1]["reward_mean"] == 0.25
    err = capsys.readouterr().err
    assert "stage 3" in err and "tok/s/gpu 1,234" in err and "reward 0.250" in err
    other = tmp_path / "rank1"
    with MetricsWriter(other, rank=1, stage=3) as w:
        assert w.log(**_row(1)) is None
    assert not other.exists()


def test_resume_truncates_rows_after_resumed_step(tmp_path):
    """Pins: after kill + resume from step 3, metrics.jsonl holds each step once — rows 4-5 of the
    killed run and a line cut mid-write are dropped, other stages' rows are kept."""
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(tmp_path, rank=0, stage=1, progress=False) as w:
        w.log(**_row(9))
    with MetricsWriter(tmp_path, rank=0, stage=2, progress=False) as w:
        for s in range(1, 6):
            w.log(**_row(s))
    with open(path, "a") as f:
        f.write('{"stage": 2, "step": 6, "lo')  # SIGKILL mid-line
    with MetricsWriter(tmp_path, rank=0, stage=2, start_step=3, progress=False) as w:
        for s in range(4, 7):
            w.log(**_row(s))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [(1, 9)] + [(2, s) for s in range(1, 7)]
    assert truncate_metrics(path, 100) == 0


def test_tensorboard_missing_warns_once(tmp_path):
    """Pins: run.tensorboard without the tensorboard package is a one-line warning, not a crash."""
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    with pytest.warns(UserWarning, match="pip install tensorboard"):
        w = MetricsWriter(tmp_path, rank=0, stage=1, progress=False, tensorboard=True)
    w.log(**_row(1))
    w.close()


def test_plain_progress_lines_every_log_every_steps(tmp_path, capsys):
    """run.progress=false: one plain line per `log_every` steps (and the last), with an ETA."""
    writer = MetricsWriter(tmp_path, 0, stage=3, total_steps=5, progress=False, log_every=2)
    for step in range(1, 6):
        writer.log(step=step, loss=1.0 / step, lr=1e-4, grad_norm=0.5, tokens=100, tokens_per_s_per_gpu=1000.0,
                   mfu=None, mem_gb=1.0)
    writer.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in lines] == ["stage 3 step 2/5", "stage 3 step 4/5", "stage 3 step 5/5"]
    assert "loss 0.5000" in lines[0] and "elapsed, eta 0:00:0" in lines[0]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5  # every step is still a row
