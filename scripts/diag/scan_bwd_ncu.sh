#!/usr/bin/env bash
# ncu profile of the mixer scan backward v4 (mixer_scan_bwd4.cuh) at b1 L8192, bf16, one kernel launch.
# Usage on the device (after the extension is built in place): bash scripts/diag/scan_bwd_ncu.sh $OUT
# Writes $OUT/ncu_scan_bwd.txt: issue activity, warp stall reasons, instruction mix, shared-memory wavefronts.
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
source "$(dirname "$0")/ncu_common.sh"
ncu_profile "$OUT/ncu_scan_bwd.txt" "b1 L8192 bwd v4" 200 mixer_scan_bwd4 2 1 \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables -- \
  python3 scripts/diag/scan_case.py 1 8192 --backward
ncu_summary "$OUT/ncu_scan_bwd.txt" "Stall|stall|Bank|Wavefronts|Shared" 80
