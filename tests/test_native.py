"""The optional native extension lingshu_fast._C: that it is built where it can be, that the CMake
project puts it where setup.py expects it, and that its absence is a clear error or a silent
numpy fallback as documented. Equality of its results with the numpy paths is in test_packing.py
and test_rope.py.
"""
import builtins
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lingshu_fast.data import packing, rope

ROOT = Path(__file__).resolve().parents[1]


def _toolchain_present() -> bool:
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return False
    return shutil.which("cmake") is not None and (shutil.which("c++") or shutil.which("g++")) is not None


@pytest.mark.skipif(not _toolchain_present(), reason="no CMake/C++ compiler/pybind11: the numpy paths are used")
def test_extension_is_importable_when_the_toolchain_exists():
    """Pins the packaging: with a toolchain, `pip install -e .` must leave lingshu_fast._C importable."""
    from lingshu_fast import _C

    assert hasattr(_C, "plan_packing") and hasattr(_C, "mrope_position_ids")
    assert packing.load_native("auto") is _C


def _hide_native(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "lingshu_fast" and fromlist and "_C" in fromlist:
            raise ImportError("lingshu_fast._C hidden by the test")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.delitem(sys.modules, "lingshu_fast._C", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_extension_falls_back_or_says_how_to_build(monkeypatch):
    """auto -> numpy silently; native -> ImportError naming the build command."""
    _hide_native(monkeypatch)
    assert packing.load_native("auto") is None
    plan = packing.plan_packing(np.array([3, 4, 5]), 8, backend="auto")
    assert plan.num_bins == 2
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        packing.plan_packing(np.array([3, 4, 5]), 8, backend="native")
    with pytest.raises(ImportError, match="backend='numpy'"):
        rope.sample_position_ids(np.array([1, 2]), None, image_token_id=9, vision_start_token_id=8, backend="native")


def test_native_rejects_bad_arrays():
    """The C++ side checks its inputs itself (it is callable directly), raising ValueError."""
    _C = pytest.importorskip("lingshu_fast._C")
    with pytest.raises(ValueError, match="permutation"):
        _C.plan_packing(np.array([1, 2, 3]), np.array([0, 0, 1]), 4, 2)
    with pytest.raises(ValueError, match="same size"):
        _C.plan_packing(np.array([1, 2, 3]), np.array([0, 1]), 4, 2)
    with pytest.raises(ValueError, match="shape"):
        _C.mrope_position_ids(np.array([1, 2]), np.array([1, 2]), 9, 8, 2)
    out = _C.mrope_position_ids(np.array([1, 2, 3]), np.zeros((0, 3), np.int64), 9, 8, 2)
    np.testing.assert_array_equal(out, np.tile(np.arange(3), (3, 1)))


@pytest.mark.slow
@pytest.mark.skipif(not _toolchain_present(), reason="no CMake/C++ compiler/pybind11")
def test_cmake_build_lands_in_output_dir(tmp_path):
    """The contract with setup.py: configuring with LINGSHU_OUTPUT_DIR puts `_C<ext suffix>` there
    and the result imports, with the same arguments setup.py passes. Built in a scratch dir so the
    installed copy is not touched (slow-ish: it compiles the pybind11 headers)."""
    import sysconfig

    import pybind11

    build, out = tmp_path / "build", tmp_path / "out"
    build.mkdir()
    subprocess.run(
        ["cmake", str(ROOT), f"-DLINGSHU_OUTPUT_DIR={out}", f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DCMAKE_BUILD_TYPE=Release"],
        cwd=build, check=True, capture_output=True,
    )
    subprocess.run(["cmake", "--build", ".", "--parallel", "2"], cwd=build, check=True, capture_output=True)
    built = out / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    assert built.is_file()
    spec = importlib.util.spec_from_file_location("_C", built)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    order, offsets, oversize = module.plan_packing(np.array([5, 3, 9]), np.array([2, 0, 1]), 8, 4)
    assert order.tolist() == [0, 1] and offsets.tolist() == [0, 2] and oversize.tolist() == [2]
