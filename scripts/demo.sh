#!/usr/bin/env bash
# The main job of the README: installs everything, then runs the four-stage demo on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec lingshu-fast demo "$@"
