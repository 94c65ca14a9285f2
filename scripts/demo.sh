#!/usr/bin/env bash
# The main job of the README: installs everything, then runs the four-stage demo on CPU, with the
# interpreter scripts/install.sh installed into (scripts/python_env.sh).
set -euo pipefail
source "$(dirname "$0")/python_env.sh"
cd "$LF_ROOT"
bash scripts/install.sh
base=$(lf_base_python)
PY=$(lf_target_python "$base")
exec "$PY" -m lingshu_fast.cli demo "$@"
