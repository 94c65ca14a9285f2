#!/usr/bin/env bash
# Installs lingshu_fast and everything its tests and demo need into the environment that
# scripts/python_env.sh picks: the virtualenv or conda env PYTHON (default python3) runs in, or else
# the project virtualenv .venv/ (created when missing). A re-run skips pip while the stamp in that
# environment is current (scripts/install_stamp.py).
# CPU torch first: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build;
# a torch already there (a CUDA build in the user's own environment) is kept.
set -euo pipefail
source "$(dirname "$0")/python_env.sh"
cd "$LF_ROOT"
PY=$(lf_install_python)
where=$PY
if [ "$PY" = "$LF_VENV_PYTHON" ]; then where=".venv/ (to use lingshu-fast and torchrun: source .venv/bin/activate)"; fi
if "$PY" scripts/install_stamp.py check; then
    echo "scripts/install.sh: up to date in $where; skipping pip" >&2
    exit 0
fi
"$PY" -m pip install --quiet --upgrade pip setuptools wheel pybind11
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
"$PY" scripts/install_stamp.py write
echo "scripts/install.sh: installed into $where" >&2
