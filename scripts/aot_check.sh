#!/usr/bin/env bash
# Ahead-of-time compile check of every Triton kernel (kernels/_aot.py) for sm_80 and sm_90a under one or
# more triton versions: 0 spills, shared memory within the card, wgmma on sm_90a. Exit 1 on any failure.
#
# Usage: bash scripts/aot_check.sh [--triton VERSION]... [--out DIR]
#   --triton installed   the triton of the current Python (the newest, what tests/test_aot_compile.py uses)
#   --triton 3.6.0       a pinned version (the lent GPU machines run 3.6). It cannot sit next to the
#                        installed one, so it goes (once) into .cache/triton-VERSION with
#                        `pip install --no-deps --target` and is put first on PYTHONPATH for the check.
#   default: --triton installed --triton 3.6.0
#   --out DIR            keep each version's JSON report there (default: a temp dir)
# CI: `bash scripts/aot_check.sh --triton 3.6.0` (the installed version is covered by the test suite).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
VERSIONS=() OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --triton) VERSIONS+=("$2"); shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "aot_check.sh: unknown argument $1 (see the header of scripts/aot_check.sh)" >&2; exit 2 ;;
  esac
done
[ ${#VERSIONS[@]} -eq 0 ] && VERSIONS=(installed 3.6.0)
OUT=${OUT:-$(mktemp -d /tmp/lingshu_aot.XXXXXX)}
mkdir -p "$OUT"
status=0
for version in "${VERSIONS[@]}"; do
  extra=""
  if [ "$version" != installed ]; then
    extra="$PWD/.cache/triton-$version"
    if ! PYTHONPATH="$extra" "$PY" -c "import sys, triton; sys.exit(triton.__version__ != '$version')" 2>/dev/null; then
      rm -rf "$extra"
      "$PY" -m pip install --quiet --no-deps --target "$extra" "triton==$version" \
        || { echo "aot_check.sh: could not install triton==$version into $extra" >&2; status=1; continue; }
    fi
  fi
  report="$OUT/aot_triton_$version.json"
  env -u TRITON_INTERPRET PYTHONPATH="$extra${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m lingshu_fast.kernels._aot \
    > "$report" 2> "$OUT/aot_triton_$version.log"
  rc=$?
  "$PY" - "$report" "$version" <<'PYEOF' || rc=1
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except (OSError, json.JSONDecodeError):
    sys.exit(f"aot_check.sh: triton {sys.argv[2]}: no report (see {sys.argv[1][:-5]}.log)")
print(f"triton {report['triton']}: {len(report['results'])} compiles, {'ok' if report['ok'] else 'FAILED'}")
for r in report["results"]:
    flag = "; ".join(r["problems"]) or "ok"
    print(f"  {r['spec']:<68} sm_{r['capability']} regs={r.get('registers')} smem={r.get('shared_bytes')} "
          f"spill={r.get('spill_store_bytes')}/{r.get('spill_load_bytes')} wgmma={r.get('wgmma')}  {flag}")
sys.exit(0 if report["ok"] else 1)
PYEOF
  [ "$rc" = 0 ] || status=1
done
echo "aot_check.sh: reports in $OUT (status $status)"
exit "$status"
