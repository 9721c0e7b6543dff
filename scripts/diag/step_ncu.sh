#!/usr/bin/env bash
# ncu profile of the fused decode step (issue 4) at batch 64 and 256, cold state (the bench's slot pool),
# fp32 state, one launch each, per kernel version. Usage on the device after the in-place build:
#   bash scripts/diag/step_ncu.sh $OUT      -> $OUT/ncu_step.txt (+ a grep summary on stdout)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
source "$(dirname "$0")/ncu_common.sh"
CASE=$(mktemp /tmp/step_once.XXXX.py)
cat > "$CASE" <<'PY'
import sys, torch
from bench.kernels_step import _apriel_fn
fn = _apriel_fn(int(sys.argv[1]), torch.float32, "compact", True)[0]
with torch.no_grad():
    for _ in range(12):
        fn()
torch.cuda.synchronize()
PY
for cfg in "64 v2" "64 v3" "256 v3"; do
  set -- $cfg
  APRIEL_STEP_KERNEL=$2 ncu_profile "$OUT/ncu_step.txt" "b$1 $2" 120 mixer_step 10 1 \
    --section MemoryWorkloadAnalysis -- python3 "$CASE" "$1"
done
ncu_summary "$OUT/ncu_step.txt" "Memory Throughput|L1/TEX Cache Throughput|Stall|Mem Busy|Max Bandwidth"
