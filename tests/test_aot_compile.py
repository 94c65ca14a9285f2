"""Ahead-of-time compile checks of every Triton kernel for the A100 (sm_80) and H100 (sm_90a).

The interpreter accepts code the real compiler rejects (tl.dot tiles under 16, shared memory that
does not fit, register spills), so CI compiles each kernel's `aot_specs()` with triton 3.9's real
compiler for both targets on this CPU-only machine. The compile runs in a subprocess because
tests/conftest.py sets TRITON_INTERPRET=1 for the whole session, and its Triton cache is a fresh temp
dir so that a stale cache cannot hide a failure. scripts/aot_check.sh runs the same check under
triton 3.6, the version of the GPU machines, in a second install.
"""
import json
import os
import subprocess
import sys

import pytest

from lingshu_fast.kernels import _aot

_CHECKED_MODULES = ("fused_linear_cross_entropy", "grpo_advantages", "fused_linear_grpo_loss", "image_pack")


@pytest.fixture(scope="module")
def aot_report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lingshu_fast.kernels._aot"], capture_output=True, text=True,
                          env=env, timeout=2400, check=False)  # ~110 compiles: minutes on 2 cores
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
    use wgmma on sm_90a, and every kernel (forward, the backward's dlogits, dW and dE, and the 3-pass
    path's logits, in-place dlogits and accumulating dW) must be checked
    for both cards in bf16 and fp32 (tf32 and ieee, torch's default for fp32 matmuls), at the real 7B
    vocabulary."""
    flce = [r for r in aot_report["results"] if r["spec"].startswith(("flce_", "grpo_loss_"))]
    seen = {(r["spec"].split("[")[0], r["capability"], r["spec"].split("[")[1].split(",")[1]) for r in flce}
    for kernel in ("flce_fwd", "flce_bwd_dlogits", "flce_bwd_dw", "flce_bwd_de", "flce_3p_logits",
                   "flce_3p_softmax_grad", "flce_3p_dw_accumulate"):
        for cc in (80, 90):
            for variant in ("tf32", "ieee"):
                assert (kernel, cc, variant) in seen, f"no AOT spec for {kernel} {variant} on sm_{cc}"
    for kernel in ("grpo_loss_fwd", "grpo_loss_bwd_dlogits", "grpo_loss_bwd_dw", "grpo_loss_bwd_de"):
        assert {(kernel, 80, "tf32"), (kernel, 90, "tf32")} <= seen, f"the GRPO loss path lacks {kernel}"
    for r in flce:
        assert "V=152064/tp" in r["spec"], r["spec"]  # Qwen2.5-VL-7B's vocab_size
        expected_target = ".target sm_90a" if r["capability"] == 90 else ".target sm_80"
        assert r["ptx_target"] == expected_target, r
        has_dot = "softmax_grad" not in r["spec"]  # the 3-pass in-place dlogits kernel is element-wise
        assert r["expects_wgmma"] == (has_dot and "ieee" not in r["spec"]), r
        if r["capability"] == 80:
            assert not r["wgmma"], r  # sm_80 has no wgmma: its presence would mean a wrong target
    assert any(r["wgmma"] for r in flce if r["capability"] == 90 and "bf16" in r["spec"])


def test_every_kernel_module_is_checked(aot_report):
    """Each kernel module contributes compiled specs: none may drop out of the report unnoticed."""
    prefixes = {"fused_linear_cross_entropy": "flce_", "fused_linear_grpo_loss": "grpo_loss_",
                "grpo_advantages": "grpo_advantages[", "image_pack": "image_pack["}
    assert set(prefixes) == set(_CHECKED_MODULES) == set(_aot.KERNEL_MODULES)
    for module, prefix in prefixes.items():
        assert any(r["spec"].startswith(prefix) for r in aot_report["results"]), f"{module}: no spec compiled"


def test_discovery_fails_on_a_missing_or_spec_less_module(monkeypatch, tmp_path):
    """The check used to loop over whatever it found: a kernel module that failed to import, or listed no
    specs, silently left CI green. Both are now errors naming the module."""
    with pytest.raises(_aot.AotDiscoveryError, match="kernels/no_such_kernel.py: cannot import"):
        _aot.discover_specs(("no_such_kernel",))
    (tmp_path / "spec_less_kernel.py").write_text("def aot_specs():\n    return []\n")
    import lingshu_fast.kernels as kernels_pkg

    monkeypatch.setattr(kernels_pkg, "__path__", [*kernels_pkg.__path__, str(tmp_path)])
    with pytest.raises(_aot.AotDiscoveryError, match="spec_less_kernel.py declares no AOT specs"):
        _aot.discover_specs(("spec_less_kernel",))
