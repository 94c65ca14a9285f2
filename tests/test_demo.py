"""The README's main job, slimmed: `lingshu-fast demo` runs every stage on the embedded tiny model
and data, prints the per-stage table and leaves an HF export that transformers loads and generates
from. Pins the chaining of stages (each starts from the previous stage's export)."""
import json
import subprocess
import sys


def test_demo_runs_all_stages(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "lingshu_fast.cli", "demo", "--out", str(out), "--max-steps", "3"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage  steps  final loss  tokens/s/GPU  eval acc" in proc.stdout
    assert "transformers loaded" in proc.stdout and "generated:" in proc.stdout
    for stage in (1, 2, 3, 4):
        rows = [json.loads(x) for x in (out / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3] and all(r["stage"] == stage for r in rows)
        if stage < 4:
            assert 0.0 <= rows[-1]["eval/overall/accuracy"] <= 1.0  # end-of-stage eval in the last row
        else:
            assert all(0.0 <= r["reward_mean"] <= 1.5 for r in rows)
        assert (out / f"stage{stage}" / "hf" / "config.json").exists()
    assert "stage 4 mean reward (first 3 -> last 3 rollouts)" in proc.stdout
    cfg2 = (out / "stage2" / "config.yaml").read_text()
    assert str(out / "stage1" / "hf") in cfg2  # stage 2 started from stage 1's export
    assert str(out / "stage3" / "hf") in (out / "stage4" / "config.yaml").read_text()
