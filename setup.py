"""Packaging for lingshu_fast.

The repo folders `kernels/` and `parallel/` are installed as `lingshu_fast.kernels` and
`lingshu_fast.parallel`, never as top-level packages: PyPI has an unrelated `kernels` package and
transformers probes for it.

The optional native extension `lingshu_fast._C` (packing planner, M-RoPE index builder) is built
with CMake when CMake and a C++ compiler are present. If either is missing, or the build fails,
the install still succeeds and the pure-Python/numpy paths are used; set LINGSHU_REQUIRE_NATIVE=1
to make a failed native build an error instead.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    def build_extensions(self):
        # Iterate over a copy: a skipped native extension is dropped from self.extensions so that
        # setuptools does not look for (and copy) a library that was never built.
        for ext in list(self.extensions):
            self.build_extension(ext)

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        required = os.environ.get("LINGSHU_REQUIRE_NATIVE") == "1"
        if shutil.which("cmake") is None:
            self._skip(ext, "cmake not found", required)
            return
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake_args = [
            f"-DLINGSHU_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        try:
            import pybind11

            cmake_args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            self._skip(ext, "pybind11 not importable", required)
            return
        try:
            subprocess.run(["cmake", ext.source_dir, *cmake_args], cwd=build_dir, check=True)
            subprocess.run(["cmake", "--build", ".", "--parallel", "2"], cwd=build_dir, check=True)
        except subprocess.CalledProcessError as err:
            self._skip(ext, f"native build failed ({err})", required)

    def _skip(self, ext, why: str, required: bool):
        msg = f"lingshu_fast: not building {ext.name}: {why}; the numpy paths will be used"
        if required:
            raise RuntimeError(msg)
        print(msg, file=sys.stderr)
        self.extensions.remove(ext)


packages = find_packages(include=["lingshu_fast", "lingshu_fast.*"])
packages += ["lingshu_fast.kernels", "lingshu_fast.parallel"]

setup(
    name="lingshu_fast",
    version="0.1.0",
    description="Custom-kernel trainer for Lingshu-style medical multimodal LLMs (Qwen2.5-VL)",
    python_requires=">=3.10",
    packages=packages,
    package_dir={
        "lingshu_fast": "lingshu_fast",
        "lingshu_fast.kernels": "kernels",
        "lingshu_fast.parallel": "parallel",
    },
    package_data={"lingshu_fast": ["recipes/*.yaml", "assets/**/*", "model/architectures/*.json"]},
    include_package_data=True,
    ext_modules=[CMakeExtension("lingshu_fast._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "transformers>=5.0",
        "megatron-core>=0.15,<=0.16.1",
        "liger-kernel>=0.8.5",
        "safetensors>=0.4",
        "pillow>=10",
        "pydicom>=3.0",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.6", "liger-kernel>=0.8.5", "matplotlib>=3.8", "pyarrow>=14"],
        # reading Parquet releases of evaluation benchmarks (VQA-RAD, PathVQA, MMMU, MedMCQA, ...)
        "eval": ["pyarrow>=14"],
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["lingshu-fast=lingshu_fast.cli:main"]},
    zip_safe=False,
)
