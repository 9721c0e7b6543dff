#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has no package index), fetched here into .whl/ (git-ignored) and carried with a
# device call (`carry: [".whl"]`, or inside .snap/). Today: nvidia-cutlass, whose headers the scan's TMA staging
# compiles against (scripts/gpu_run.sh unpacks them).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl "nvidia-cutlass==${CUTLASS_VERSION:-4.2.0.0}"
ls -l .whl
