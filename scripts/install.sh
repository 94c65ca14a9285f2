#!/usr/bin/env bash
# Installs lingshu_fast and everything its tests and demo need into the current Python.
# CPU torch first: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --upgrade pip setuptools wheel pybind11
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
