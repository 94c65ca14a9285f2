#!/usr/bin/env bash
# Lint (run by .ci/run after scripts/test.sh, which installed the dev tools): ruff's pyflakes and
# isort rules over the whole repository ([tool.ruff] in pyproject.toml). The layer contract is a
# test (tests/test_layers.py) and runs with the suite.
set -uo pipefail
source "$(dirname "$0")/python_env.sh"
cd "$LF_ROOT"
base=$(lf_base_python) && PY=$(lf_target_python "$base") || exit 1
"$PY" -m ruff --version >/dev/null 2>&1 || "$PY" -m pip install --quiet "ruff>=0.6" || exit 1
exec "$PY" -m ruff check .
