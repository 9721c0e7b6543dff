#!/usr/bin/env bash
# ncu profile of the fused decode step (issue 4) at batch 64 and 256, cold state (the bench's slot pool),
# fp32 state, one launch each, per kernel version. Usage on the device after the in-place build:
#   bash scripts/diag/step_ncu.sh $OUT      -> $OUT/ncu_step.txt (+ a grep summary on stdout)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
cat > /tmp/step_once.py <<'PY'
import sys, torch
from bench.kernels_step import _apriel_fn
fn = _apriel_fn(int(sys.argv[1]), torch.float32, "compact", True)[0]
with torch.no_grad():
    for _ in range(12):
        fn()
torch.cuda.synchronize()
PY
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for cfg in "64 v2" "64 v3" "256 v3"; do
  set -- $cfg
  echo "=== b$1 $2" >> "$OUT/ncu_step.txt"
  APRIEL_STEP_KERNEL=$2 timeout 120 "$NCU" --clock-control none --kernel-name regex:mixer_step --launch-skip 10 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
    --section Occupancy --section LaunchStats --section InstructionStats ${NCU_EXTRA_SECTIONS:-} \
    python3 /tmp/step_once.py $1 >> "$OUT/ncu_step.txt" 2>&1
done
grep -E "===|Duration|DRAM Throughput|Memory Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Issue Slots Busy|No Eligible|Active Warps Per|Warp Cycles Per Issued|Executed Instructions  |Registers Per|Achieved Occupancy|Stall|Waves Per SM|Mem Busy|Max Bandwidth" "$OUT/ncu_step.txt" | head -150
