#!/usr/bin/env bash
# ncu profile of the mixer scan forward (v4) at the bar shapes, one kernel launch each, per K variant.
# Usage on the device (after the extension is built in place): bash scripts/diag/scan_fwd_ncu.sh $OUT
# Writes $OUT/ncu_scan_fwd.txt: issue activity, warp stall reasons, instruction mix, occupancy.
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
cat > /tmp/scan_fwd_once.py <<'PY'
import sys, torch
from apriel_kernels import mixer_scan
b, L = int(sys.argv[1]), int(sys.argv[2])
D, X, N, R, W = 4096, 1024, 16, 16, 4
dev, dt = "cuda", torch.bfloat16
args = dict(zxbc=torch.randn(b, L, 2 * D + 2 * X, device=dev, dtype=dt),
            dt_low=torch.randn(b, L, R, device=dev, dtype=dt) * 0.5,
            conv_weight=torch.randn(D, W, device=dev, dtype=dt) * 0.5, conv_bias=torch.randn(D, device=dev, dtype=dt) * 0.1,
            dt_proj_weight=torch.randn(D, R, device=dev, dtype=dt) * R ** -0.5,
            dt_proj_bias=torch.full((D,), -2.5, device=dev, dtype=dt),
            A_log=torch.log(torch.arange(1, N + 1, device=dev, dtype=torch.float32)).repeat(D, 1),
            D=torch.ones(D, device=dev))
with torch.no_grad():
    for _ in range(3):
        mixer_scan(**args, d_inner=D, d_xb=X, d_state=N)
torch.cuda.synchronize()
PY
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for cfg in "1 8192 v4k8" "8 4096 v4k4"; do
  set -- $cfg
  echo "=== b$1 L$2 $3" >> "$OUT/ncu_scan_fwd.txt"
  APRIEL_SCAN_FWD=$3 timeout 120 "$NCU" --clock-control none --kernel-name regex:mixer_scan_fwd4 --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section SchedulerStats --section WarpStateStats --section InstructionStats \
    --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis ${NCU_EXTRA_SECTIONS:-} \
    python3 /tmp/scan_fwd_once.py $1 $2 >> "$OUT/ncu_scan_fwd.txt" 2>&1
done
grep -E "===|Duration|Issue Slots Busy|Executed Ipc A|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|Executed Instructions  |Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit" "$OUT/ncu_scan_fwd.txt" | head -120
