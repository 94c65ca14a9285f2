# Sourced by install.sh, demo.sh and test.sh: which Python they install into and run with.
#
# - PYTHON (default: python3) names an interpreter: a command on PATH or a path (a relative path
#   is taken from the folder the script was started in).
# - If that interpreter runs inside a virtualenv or a conda environment, that environment is used as
#   it is: lingshu_fast goes into it, and a torch already there (a CUDA build) is kept.
# - Otherwise (a system, pyenv or other base Python; Debian/Ubuntu's refuse pip under PEP 668) the
#   project virtualenv .venv/ at the repo root is used, created from that interpreter when missing.
#   An existing .venv/ is kept whichever interpreter made it: delete it to rebuild it from another.
# - An activated virtualenv takes effect through PATH (its python3); a PYTHON that is set wins.
#
# Run as `bash scripts/python_env.sh target|ensure-venv` it prints the interpreter it picks (after
# creating .venv/ for ensure-venv) and installs nothing: tests/test_install_script.py drives it so.

LF_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The scripts run Python from the repo root: keep that folder off sys.path (`python -m` puts the working
# directory first), or our kernels/ folder shadows Hugging Face's `kernels` package, which transformers
# (>= 5.25 installs it) imports.
export PYTHONSAFEPATH=1
LF_VENV="$LF_ROOT/.venv"
LF_VENV_PYTHON="$LF_VENV/bin/python"

# The scripts cd to the repo root next: a relative PYTHON must be made absolute first. Symlinks are
# kept as they are, since a virtualenv's bin/python is a symlink to its base interpreter.
case "${PYTHON:-}" in
    "" | /*) ;;
    */*) PYTHON="$PWD/$PYTHON" ;;
esac
if [ -n "${PYTHON:-}" ]; then export PYTHON; fi

lf_fail() {
    echo "scripts/$(basename "$0"): $*" >&2
    return 1
}

# The interpreter PYTHON names, as an absolute path.
lf_base_python() {
    local py
    py=$(command -v "${PYTHON:-python3}") ||
        lf_fail "PYTHON=${PYTHON:-python3} is not a command or an executable file; set PYTHON to a python3 (>= 3.10)" || return 1
    echo "$py"
}

# "env" when $1 runs inside a virtualenv (venv, or virtualenv's old real_prefix) or a conda
# environment (a full prefix of its own, so sys.prefix == sys.base_prefix: conda-meta tells it).
lf_env_kind() {
    local kind
    kind=$("$1" -c 'import os, sys
env = sys.prefix != sys.base_prefix or hasattr(sys, "real_prefix") or os.path.isdir(os.path.join(sys.prefix, "conda-meta"))
print("env" if env else "base")' 2>/dev/null) || kind=""
    case "$kind" in
        env | base) echo "$kind" ;;
        *) lf_fail "$1 did not run as Python; set PYTHON to a python3 (>= 3.10)" ;;
    esac
}

# The interpreter to install into and run with, for the base interpreter $1.
lf_target_python() {
    local kind
    kind=$(lf_env_kind "$1") || return 1
    if [ "$kind" = env ]; then echo "$1"; else echo "$LF_VENV_PYTHON"; fi
}

# Makes .venv/ from the base interpreter $1 unless a usable one (its python runs and has pip) is there.
lf_ensure_venv() {
    local base=$1
    if "$LF_VENV_PYTHON" -c "import pip" >/dev/null 2>&1; then
        lf_note_other_base "$base"
        return 0
    fi
    if [ -e "$LF_VENV" ] && [ ! -f "$LF_VENV/pyvenv.cfg" ]; then
        lf_fail "$LF_VENV exists but is not a virtualenv (no pyvenv.cfg); move it away and re-run" || return 1
    fi
    # Debian/Ubuntu ship venv in the stdlib but ensurepip in the python3-venv package.
    if ! "$base" -c "import venv, ensurepip" >/dev/null 2>&1; then
        local pkg
        pkg=$("$base" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])' 2>/dev/null || echo python3-venv)
        lf_fail "$base cannot create the project virtualenv .venv/ (no venv/ensurepip module): on Debian/Ubuntu run \`sudo apt-get install python3-venv\` ($pkg for this interpreter), then re-run" || return 1
    fi
    echo "scripts/$(basename "$0"): creating the project virtualenv .venv/ from $base" >&2
    # --clear: a half-made .venv/ (say, from a run before python3-venv was installed) is rebuilt.
    "$base" -m venv --clear "$LF_VENV" >&2 || lf_fail "\`$base -m venv $LF_VENV\` failed (its message is above)"
}

# One line when PYTHON asks for another interpreter than the one the kept .venv/ was made from.
lf_note_other_base() {
    [ -n "${PYTHON:-}" ] || return 0
    local made_from wanted
    made_from=$("$LF_VENV_PYTHON" -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))')
    wanted=$("$1" -c 'import os, sys; print(os.path.realpath(sys.executable))')
    if [ "$made_from" != "$wanted" ]; then
        echo "scripts/$(basename "$0"): note: keeping .venv/ (made from $made_from) although PYTHON=$PYTHON; delete .venv/ to rebuild it from PYTHON" >&2
    fi
}

# The interpreter to install into, with .venv/ made first when that is the one (stdout: its path).
lf_install_python() {
    local base py
    base=$(lf_base_python) || return 1
    py=$(lf_target_python "$base") || return 1
    if [ "$py" = "$LF_VENV_PYTHON" ]; then lf_ensure_venv "$base" || return 1; fi
    echo "$py"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    case "${1:-}" in
        target) base=$(lf_base_python) && lf_target_python "$base" ;;
        ensure-venv) lf_install_python ;;
        *) lf_fail "usage: bash scripts/python_env.sh target|ensure-venv" ;;
    esac
fi
