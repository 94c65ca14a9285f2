#!/usr/bin/env bash
# One prepared command for a CUDA machine: the CUDA tests, then the benchmarks in order of value,
# each part in its own time budget, recorded as they finish (bench/README.md: "On a lent GPU machine").
#
# Usage (from anywhere):
#   bash bench/gpu.sh [--quick] [--parts abcd] [--budget SECONDS] [--out DIR]
#   bash bench/gpu.sh --dry-run [--quick]     # no GPU needed: checks the plan (CI runs this)
#
#   --quick     the short selection: the whole run within 470 s (the device tool's 10-minute command
#               limit leaves room for the machine's start and the transfers)
#   --parts     a: `cuda`-marked tests; b: kernel benchmarks at the 7B head (fused CE vs Liger / CCE /
#               torch.compile, GRPO loss vs Liger, image pack GB/s); c: the stage-3 step at the 7B
#               widths (MFU, tokens/s/GPU); d: the rest of the bench. Default abcd, in that order.
#   --budget    the run's total seconds (default 470 with --quick, else 570); each part has its own
#               budget inside it (bench/gpu_run.py's PLAN; the dry run prints them)
#   --out DIR   where the results go as each part finishes (on the device tool: --out "$OUT"):
#               summary.md, bench.json (every benchmark row, for bench/record.py), results.tar.gz
#               (per-part rows, JSON and logs), gpu.log (this whole output), and at the end
#               history.jsonl, RESULTS.md and history.png
#   --dry-run   print the plan and its budgets and check that every part's tests collect, with the
#               wheels installed from wheels/ when that folder is there (else it says how to make it)
#
# Environment. The lent GPU machines have Python 3.12, torch 2.11, triton 3.6, transformers 5.17 and
# no package index: `bash bench/gpu_wheels.sh` (on a machine with one) downloads the wheels the run
# needs into wheels/ (git-ignored), which travels with the checkout (the device tool's `carry`).
# This script installs them offline (pip --no-index --find-links wheels/ --no-deps) into a temporary
# folder and puts the checkout on PYTHONPATH through a link folder that maps kernels/ and parallel/
# to lingshu_fast.kernels / lingshu_fast.parallel as setup.py does (the repo root itself stays off
# sys.path: DESIGN.md on the `kernels` name). Nothing is written into the checkout except
# bench/history.jsonl, bench/RESULTS.md and bench/history.png. The commit recorded with the figures
# is `git rev-parse` when .git is there, else $LINGSHU_COMMIT (the device tool copies no .git).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LINGSHU_GPU_START="${LINGSHU_GPU_START:-$(date +%s)}"
DRY=0 OUT_DIR="" RUN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --quick) RUN_ARGS+=(--quick); shift ;;
    --parts|--budget) [ $# -ge 2 ] || { echo "gpu.sh: $1 needs a value" >&2; exit 2; }; RUN_ARGS+=("$1" "$2"); shift 2 ;;
    --out) [ $# -ge 2 ] || { echo "gpu.sh: --out needs a folder" >&2; exit 2; }; OUT_DIR="$2"; shift 2 ;;
    *) echo "gpu.sh: unknown argument $1 (see the header of bench/gpu.sh)" >&2; exit 2 ;;
  esac
done
# The interpreter scripts/install.sh installs into: $PYTHON; else python3 when it is a virtualenv's
# (the GPU machines' is); else the checkout's .venv/ when there is one; else python3.
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif python3 -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then PY=python3
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
if [ -n "$OUT_DIR" ] && [ "$DRY" = 0 ]; then
  mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
  exec > >(tee -a "$OUT_DIR/gpu.log") 2>&1  # the whole output comes back even if the command is killed
  RUN_ARGS+=(--out "$OUT_DIR")
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lingshu_gpu.XXXXXX")"
# a run keeps $WORK/parts (per-step rows, JSON, logs); the rest goes
trap 'rm -rf "$WORK/site" "$WORK/deps"; if [ "$DRY" = 1 ] || [ ! -d "$WORK/parts" ]; then rm -rf "$WORK"; fi' EXIT
# PYTHONSAFEPATH: `python -m pytest` from the repo root would put the root on sys.path, where the
# source folder lingshu_fast/ (without kernels/ and parallel/) would shadow the link folder below
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONSAFEPATH=1

# -- the checkout as lingshu_fast, and the carried wheels ----------------------------------------------
SITE="$WORK/site"
mkdir -p "$SITE/lingshu_fast"
for entry in "$ROOT"/lingshu_fast/* "$ROOT"/lingshu_fast/.[!.]*; do
  [ -e "$entry" ] && ln -s "$entry" "$SITE/lingshu_fast/$(basename "$entry")"
done
ln -sfn "$ROOT/kernels" "$SITE/lingshu_fast/kernels"
ln -sfn "$ROOT/parallel" "$SITE/lingshu_fast/parallel"
DEPS="$WORK/deps"
PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || { echo "gpu.sh: $PY does not run" >&2; exit 1; }
foreign=""
for whl in "$ROOT"/wheels/*-cp3*.whl; do  # binary wheels must match this Python (cp312 on the GPU machines)
  [ -e "$whl" ] && case "$(basename "$whl")" in *"-cp${PYVER/./}-"*) ;; *) foreign="$(basename "$whl")" ;; esac
done
if [ -n "$foreign" ] && [ "$DRY" = 1 ]; then
  echo "gpu.sh: wheels/ is for another Python ($foreign; this is $PYVER): the dry run uses this Python's" \
       "packages (rehearse with bash bench/gpu_wheels.sh --python-version $PYVER)"
elif [ -n "$foreign" ]; then
  echo "gpu.sh: $foreign in wheels/ is not for this Python ($PYVER, $PY); run" \
       "bash bench/gpu_wheels.sh --python-version $PYVER" >&2
  exit 1
elif compgen -G "$ROOT/wheels/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --find-links "$ROOT/wheels" --no-deps --no-compile --disable-pip-version-check \
    --target "$DEPS" "$ROOT"/wheels/*.whl || { echo "gpu.sh: installing wheels/*.whl failed" >&2; exit 1; }
  echo "gpu.sh: installed $(ls "$ROOT"/wheels/*.whl | wc -l) wheels from wheels/ into $DEPS"
else
  echo "gpu.sh: no wheels/ folder. The GPU machines lack megatron-core, liger-kernel, pydicom and" \
       "cut-cross-entropy: on a machine with a package index run \`bash bench/gpu_wheels.sh\`, then carry" \
       "wheels/ with the checkout (bench/README.md). Using the packages this Python has."
fi
export PYTHONPATH="$SITE:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${LINGSHU_COMMIT:-}" ]; then
  LINGSHU_COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  export LINGSHU_COMMIT
fi

# -- what must import (CUDA only for a real run) ----------------------------------------------------------
"$PY" - "$DRY" <<'EOF' || exit 1
import sys
dry = sys.argv[1] == "1"
import torch
if not dry and not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA device visible to torch; run this on a GPU machine (or --dry-run to check the "
             "plan; CPU figures: pytest bench/ --benchmark --benchmark-json FILE && python bench/record.py FILE)")
missing, optional = [], []
for name in ("megatron.core", "transformers", "pytest_benchmark", "lingshu_fast.kernels", "lingshu_fast.parallel"):
    try:
        __import__(name)
    except ImportError as err:
        missing.append(f"{name} ({err})")
for name, what in (("liger_kernel", "Liger ops and peer rows"), ("cut_cross_entropy", "the CCE row"),
                   ("pydicom", "the DICOM tests")):
    try:
        __import__(name)
    except ImportError:
        optional.append(f"{name} ({what} will skip)")
if missing:
    sys.exit("gpu.sh: cannot import " + ", ".join(missing) + "; run `bash bench/gpu_wheels.sh` and carry wheels/")
if optional:
    print("gpu.sh: not importable: " + "; ".join(optional), file=sys.stderr)
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device (dry run)"
print(f"gpu.sh: {device}, torch {torch.__version__}, python {sys.version.split()[0]}")
EOF
[ "$DRY" = 1 ] && RUN_ARGS+=(--dry-run)
[ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ] && [ "$DRY" = 0 ] && \
  echo "gpu.sh: note: the checkout has uncommitted changes; the figures are recorded under $LINGSHU_COMMIT"
cd "$ROOT" || exit 1
"$PY" bench/gpu_run.py --work "$WORK/parts" "${RUN_ARGS[@]}"
status=$?
[ "$DRY" = 0 ] && echo "gpu.sh: done (status $status). Bring back \$OUT and record it: bench/README.md"
exit "$status"
