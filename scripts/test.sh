#!/usr/bin/env bash
# The test command of the README: installs everything, then runs the CPU test suite with the
# interpreter scripts/install.sh installed into (scripts/python_env.sh).
# Extra arguments go to pytest. pytest's exit code 5 (no tests collected) is a failure here.
set -uo pipefail
source "$(dirname "$0")/python_env.sh"
cd "$LF_ROOT"
bash scripts/install.sh || exit 1
base=$(lf_base_python) && PY=$(lf_target_python "$base") || exit 1
"$PY" -m lingshu_fast._native_check || true
"$PY" -m pytest tests -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$rc"
