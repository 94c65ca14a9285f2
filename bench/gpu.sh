#!/usr/bin/env bash
# One command on a CUDA machine: CUDA tests with compiled (not interpreted) Triton kernels, the whole
# bench at the CUDA shapes, then bench/record.py and bench/plot.py. Commit the numbers afterwards:
#   git add bench/history.jsonl bench/RESULTS.md bench/history.png && git commit -m "bench: <card> figures"
#
# Usage (from anywhere):  bash bench/gpu.sh [--out DIR] [--skip-tests] [--bench PATH]... [-- extra pytest args]
#   --out DIR      also copy bench.json, history.jsonl, RESULTS.md, history.png and the logs into DIR
#                  (on a lent device machine: --out "$OUT", then copy them into bench/ of your checkout)
#   --skip-tests   run only the bench
#   --bench PATH   run only these bench files (repeatable; default the whole bench/). The device tool
#                  stops a command at 10 minutes: there, run the suite in parts, e.g.
#                  `--bench bench/test_bench_e2e.py` then `--skip-tests --bench bench/test_bench_flce.py ...`;
#                  each part is recorded (history.jsonl appends, RESULTS.md keeps the latest of each row)
#
# What runs:
#  1. `pytest tests/ -m cuda` with TRITON_INTERPRET=0 LINGSHU_KERNELS=triton: the tests marked `cuda`
#     (written for CUDA tensors) with every lingshu op on its compiled Triton kernel. The other kernel
#     tests are written for CPU tensors under the Triton interpreter (tests/conftest.py sets
#     TRITON_INTERPRET=1): they cannot run uninterpreted and stay in the CPU suite; on the GPU their
#     kernels are exercised, at the 7B shapes and against torch/Liger, by the bench rows below.
#  2. `pytest bench/ --benchmark --benchmark-json bench.json` with TRITON_INTERPRET=0 and
#     LINGSHU_KERNELS=auto (Triton on CUDA tensors): kernel rows at the 7B / Liger shapes, attention
#     varlen vs padded, end-to-end steps of the 7B-dimension model (bench/README.md).
#  3. bench/record.py bench.json (appends bench/history.jsonl, rewrites this card's RESULTS.md
#     section) and bench/plot.py (bench/history.png).
#
# Environment. The lent GPU machines have Python 3.12, torch 2.11, triton, transformers and
# pytest-benchmark, but no megatron-core or liger-kernel and no package index. Download the wheels
# here, into wheels/ at the repo root (git-ignore it: `echo /wheels/ >> .git/info/exclude`), and
# carry that folder to the machine:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d wheels megatron-core==0.16.1 liger-kernel==0.8.5
# This script installs any wheels/*.whl with `pip install --no-index --no-deps --target` into a
# temporary folder, and puts the checkout on the path through a link folder that maps the repo's
# kernels/ and parallel/ to lingshu_fast.kernels / lingshu_fast.parallel as setup.py does (the repo
# root itself stays off sys.path: see DESIGN.md on the `kernels` name). Nothing is written into the
# checkout except bench/history.jsonl, bench/RESULTS.md and bench/history.png.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="" RUN_TESTS=1 BENCH_ARGS=() TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --skip-tests) RUN_TESTS=0; shift ;;
    --bench) TARGETS+=("$2"); shift 2 ;;
    --) shift; BENCH_ARGS=("$@"); break ;;
    *) echo "gpu.sh: unknown argument $1 (see the header of bench/gpu.sh)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
WORK="$(mktemp -d /tmp/lingshu_gpu.XXXXXX)"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# -- environment ------------------------------------------------------------------------------
SITE="$WORK/site"
mkdir -p "$SITE/lingshu_fast"
for entry in "$ROOT"/lingshu_fast/* "$ROOT"/lingshu_fast/.[!.]*; do
  [ -e "$entry" ] && ln -s "$entry" "$SITE/lingshu_fast/$(basename "$entry")"
done
ln -sfn "$ROOT/kernels" "$SITE/lingshu_fast/kernels"
ln -sfn "$ROOT/parallel" "$SITE/lingshu_fast/parallel"
DEPS="$WORK/deps"
if compgen -G "$ROOT/wheels/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$DEPS" "$ROOT"/wheels/*.whl \
    || { echo "gpu.sh: installing wheels/*.whl failed" >&2; exit 1; }
fi
export PYTHONPATH="$SITE:$DEPS${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF' || exit 1
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA device visible to torch; run this on a GPU machine (CPU figures: "
             "pytest bench/ --benchmark --benchmark-json FILE && python bench/record.py FILE)")
missing = []
for name in ("megatron.core", "transformers", "pytest_benchmark", "lingshu_fast.kernels", "lingshu_fast.parallel"):
    try:
        __import__(name)
    except ImportError as err:
        missing.append(f"{name} ({err})")
if missing:
    sys.exit("gpu.sh: cannot import " + ", ".join(missing) + "; put the wheels in wheels/ (see the header)")
try:
    import liger_kernel  # noqa: F401
except ImportError:
    print("gpu.sh: liger-kernel not importable: its peer rows will be skipped", file=sys.stderr)
print(f"gpu.sh: {torch.cuda.get_device_name()}, torch {torch.__version__}, python {sys.version.split()[0]}")
EOF

cd "$ROOT" || exit 1
status=0
# -- 1. CUDA tests, compiled Triton ----------------------------------------------------------------
if [ "$RUN_TESTS" = 1 ]; then
  TRITON_INTERPRET=0 LINGSHU_KERNELS=triton "$PY" -m pytest tests/ -m cuda -q -p no:cacheprovider \
    2>&1 | tee "$WORK/cuda_tests.log"
  rc=${PIPESTATUS[0]}
  # exit code 5: no test selected (no `cuda` marks yet) is not a failure
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then status=1; echo "gpu.sh: CUDA tests failed (rc $rc)" >&2; fi
fi

# -- 2. the whole bench ----------------------------------------------------------------------------
JSON="$WORK/bench.json"
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(bench/)
TRITON_INTERPRET=0 LINGSHU_KERNELS=auto "$PY" -m pytest "${TARGETS[@]}" --benchmark -q -p no:cacheprovider \
  --benchmark-json "$JSON" "${BENCH_ARGS[@]}" 2>&1 | tee "$WORK/bench.log"
rc=${PIPESTATUS[0]}
if [ "$rc" != 0 ]; then status=1; echo "gpu.sh: some benchmarks failed (rc $rc); recording the rest" >&2; fi

# -- 3. record and plot ----------------------------------------------------------------------------
if [ -s "$JSON" ]; then
  "$PY" bench/record.py "$JSON" || status=1
  "$PY" bench/plot.py || status=1
else
  echo "gpu.sh: no benchmark JSON was written; nothing recorded" >&2
  status=1
fi
if [ -n "$OUT_DIR" ]; then
  mkdir -p "$OUT_DIR"
  cp -f "$JSON" "$WORK"/*.log bench/history.jsonl bench/RESULTS.md bench/history.png "$OUT_DIR"/ 2>/dev/null
fi
echo "gpu.sh: done (status $status). Commit: git add bench/history.jsonl bench/RESULTS.md bench/history.png"
exit "$status"
