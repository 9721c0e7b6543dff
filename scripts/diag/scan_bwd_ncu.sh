#!/usr/bin/env bash
# ncu profile of the mixer scan backward v4 (mixer_scan_bwd4.cuh) at b1 L8192, bf16, one kernel launch.
# Usage on the device (after the extension is built in place): bash scripts/diag/scan_bwd_ncu.sh $OUT
# Writes $OUT/ncu_scan_bwd.txt: issue activity, warp stall reasons, instruction mix, shared-memory wavefronts.
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
cat > /tmp/scan_bwd_once.py <<'PY'
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
for v in args.values():
    v.requires_grad_(True)
dy = torch.randn(b, L, D, device=dev, dtype=dt)
for _ in range(3):
    y = mixer_scan(**args, d_inner=D, d_xb=X, d_state=N)
    torch.autograd.grad(y, list(args.values()), dy)
torch.cuda.synchronize()
PY
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
echo "=== b1 L8192 bwd v4" >> "$OUT/ncu_scan_bwd.txt"
timeout 200 "$NCU" --clock-control none --kernel-name regex:mixer_scan_bwd4 --launch-skip 2 --launch-count 1 \
  --section SpeedOfLight --section SchedulerStats --section WarpStateStats --section InstructionStats \
  --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
  ${NCU_EXTRA_SECTIONS:-} python3 /tmp/scan_bwd_once.py 1 8192 >> "$OUT/ncu_scan_bwd.txt" 2>&1
grep -E "===|Duration|Issue Slots Busy|Executed Ipc A|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|Executed Instructions  |Registers Per|Achieved Occupancy|Stall|stall|Bank|Wavefronts|Shared" "$OUT/ncu_scan_bwd.txt" | head -80
