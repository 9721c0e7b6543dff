#!/usr/bin/env bash
# ncu profile of the causal conv1d forward and backward (issue 2) at the bar shape (b1 L8192 4096 ch, bf16,
# silu, token-major), one launch each, default kernels. Usage on the device after the in-place build:
#   bash scripts/diag/conv1d_ncu.sh $OUT      -> $OUT/ncu_conv1d.txt (+ a grep summary on stdout)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
cat > /tmp/conv_once.py <<'PY'
import sys, torch
from apriel_kernels import causal_conv1d_fn
dim = int(sys.argv[1])
x = torch.randn(1, 8192, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # token-major storage
w = torch.randn(dim, 4, device="cuda", dtype=torch.bfloat16) * 0.5
b = torch.randn(dim, device="cuda", dtype=torch.bfloat16) * 0.1
x.requires_grad_(True)
for _ in range(4):
    y = causal_conv1d_fn(x, w, b, activation="silu")
    y.backward(torch.ones_like(y))
torch.cuda.synchronize()
PY
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for dim in 4096 1024; do
  echo "=== dim $dim" >> "$OUT/ncu_conv1d.txt"
  timeout 150 "$NCU" --clock-control none --kernel-name regex:"fwd_|bwd_" --launch-skip 4 --launch-count 2 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
    --section Occupancy --section LaunchStats --section InstructionStats ${NCU_EXTRA_SECTIONS:-} \
    python3 /tmp/conv_once.py $dim >> "$OUT/ncu_conv1d.txt" 2>&1
done
grep -E "===|  [a-z_:]*(fwd|bwd)_[a-z_]*kernel|Duration|DRAM Throughput|L2 Cache Throughput|Issue Slots Busy|No Eligible|Active Warps Per|Warp Cycles Per Issued|Executed Instructions  |Registers Per|Achieved Occupancy|Waves Per SM|Grid Size|Block Size" "$OUT/ncu_conv1d.txt" | head -120
