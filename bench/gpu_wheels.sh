#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels a lent GPU machine lacks into wheels/
# (git-ignored), check that nothing they need is missing there, and print the device tool's `carry`.
#
# Usage: bash bench/gpu_wheels.sh [--python-version 3.12] [--dest DIR]
#   --python-version  the GPU machine's Python (3.12 there; 3.11 to rehearse on this machine's
#                     Python: `gpu.sh` refuses wheels built for another version)
#   --dest            the folder (default wheels/ at the repo root, where bench/gpu.sh looks)
#
# The GPU image has Python 3.12, torch 2.11, triton 3.6, transformers 5.17, numpy, pillow, pyyaml,
# safetensors, tqdm, pytest and packaging (the device library's KINDS.md lists it all), and no
# megatron-core, liger-kernel, pydicom or cut-cross-entropy. pytest-benchmark is there, but carried
# at our version too (with py-cpuinfo2, which it needs). Versions are pinned: one version of each,
# or pip's offline install fails. The folder is emptied first and must stay under 60 MB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYVER=3.12 DEST="$ROOT/wheels"
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER="$2"; shift 2 ;;
    --dest) DEST="$2"; shift 2 ;;
    *) echo "gpu_wheels.sh: unknown argument $1 (see the header of bench/gpu_wheels.sh)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
[ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$ROOT/.venv/bin/python"
WHEELS=(megatron-core==0.16.1 liger-kernel==0.8.5 pydicom==3.0.2 pytest-benchmark==5.3.1 py-cpuinfo2==10.1.1
        cut-cross-entropy==25.1.1)
# What the image already has (by the names wheels require them under): the check below accepts these.
IMAGE_HAS="torch triton transformers numpy pillow pyyaml safetensors tqdm pytest packaging"

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}"

# Every requirement of every wheel (extras left out, markers evaluated for the target Python on Linux)
# must be another wheel here or a package of the image.
"$PY" - "$DEST" "$PYVER" "$IMAGE_HAS" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

dest, pyver, image = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split()
env = {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "extra": ""}
have = {canonicalize_name(n) for n in image}
needs = {}
for whl in sorted(dest.glob("*.whl")):
    have.add(canonicalize_name(re.split(r"-\d", whl.name, maxsplit=1)[0]))
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                needs.setdefault(canonicalize_name(req.name), []).append(whl.name)
missing = {name: users for name, users in needs.items() if name not in have}
if missing:
    sys.exit("gpu_wheels.sh: the GPU image lacks what these wheels need: "
             + "; ".join(f"{n} (for {', '.join(u)})" for n, u in sorted(missing.items()))
             + ": add them to WHEELS in bench/gpu_wheels.sh")
print(f"gpu_wheels.sh: requirements covered ({', '.join(sorted(needs))})")
EOF

size_kb=$(du -sk "$DEST" | cut -f1)
if [ "$size_kb" -gt $((60 * 1024)) ]; then
  echo "gpu_wheels.sh: $DEST holds ${size_kb} KB, over the 60 MB kept for it (the device tool carries 64 MiB" \
       "with the checkout)" >&2
  exit 1
fi
rel="${DEST#"$ROOT"/}"
echo "gpu_wheels.sh: $(ls "$DEST"/*.whl | wc -l) wheels, ${size_kb} KB in $DEST (Python $PYVER):"
ls -1 "$DEST"
commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
[ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ] && commit="$commit-dirty"
echo "carry: [\"$rel\"]"
echo "command: LINGSHU_COMMIT=$commit bash bench/gpu.sh --quick --out \"\$OUT\""
