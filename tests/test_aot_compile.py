"""Ahead-of-time compile checks of every Triton kernel for the A100 (sm_80) and H100 (sm_90a).

The interpreter accepts code the real compiler rejects (tl.dot tiles under 16, shared memory that
does not fit, register spills), so CI compiles each kernel's `aot_specs()` with triton 3.9's real
compiler for both targets on this CPU-only machine. The compile runs in a subprocess because
tests/conftest.py sets TRITON_INTERPRET=1 for the whole session, and its Triton cache is a fresh temp
dir so that a stale cache cannot hide a failure.
"""
import json
import os
import subprocess
import sys

import pytest

_CHECKED_MODULES = ("fused_linear_cross_entropy", "grpo_advantages", "fused_linear_grpo_loss", "image_pack")


@pytest.fixture(scope="module")
def aot_report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lingshu_fast.kernels._aot"], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"AOT compile crashed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")


def test_every_spec_compiles_fits_and_does_not_spill(aot_report):
    """Pins kernels that only work under the interpreter: every spec of every present kernel module must
    compile for its targets, fit shared memory (163 KB sm_80, 227 KB sm_90a) and spill no registers."""
    failures = [f"{r['spec']} sm_{r['capability']}: {p}" for r in aot_report["results"] for p in r["problems"]]
    assert not failures, "\n".join(failures)
    assert aot_report["ok"]


def test_flce_specs_cover_both_cards_and_use_wgmma_on_hopper(aot_report):
    """The LM-head loss is the hot matmul of the step: its tensor-core builds (bf16, fp32 with tf32) must
    use wgmma on sm_90a, and every kernel must be checked for both cards in bf16 and fp32 (tf32 and
    ieee, torch's default for fp32 matmuls)."""
    flce = [r for r in aot_report["results"] if r["spec"].startswith("flce_")]
    seen = {(r["spec"].split("[")[0], r["capability"], r["spec"].split("[")[1].split(",")[1]) for r in flce}
    for kernel in ("flce_fwd", "flce_bwd"):
        for cc in (80, 90):
            for variant in ("tf32", "ieee"):
                assert (kernel, cc, variant) in seen, f"no AOT spec for {kernel} {variant} on sm_{cc}"
    for r in flce:
        expected_target = ".target sm_90a" if r["capability"] == 90 else ".target sm_80"
        assert r["ptx_target"] == expected_target, r
        assert r["expects_wgmma"] == ("ieee" not in r["spec"]), r
        if r["capability"] == 80:
            assert not r["wgmma"], r  # sm_80 has no wgmma: its presence would mean a wrong target
    assert any(r["wgmma"] for r in flce if r["capability"] == 90 and "bf16" in r["spec"])


def test_discovery_reports_only_absent_modules(aot_report):
    """A kernel module that exists must be checked, never silently skipped as 'missing'."""
    here = os.path.join(os.path.dirname(__file__), "..", "kernels")
    for name in aot_report["missing_modules"]:
        assert name in _CHECKED_MODULES
        assert not os.path.exists(os.path.join(here, f"{name}.py")), f"{name}.py exists but was skipped"
