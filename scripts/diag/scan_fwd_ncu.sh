#!/usr/bin/env bash
# ncu profile of the mixer scan forward (v4) at the bar shapes, one kernel launch each, per K variant.
# Usage on the device (after the extension is built in place): bash scripts/diag/scan_fwd_ncu.sh $OUT
# Writes $OUT/ncu_scan_fwd.txt: issue activity, warp stall reasons, instruction mix, occupancy.
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
source "$(dirname "$0")/ncu_common.sh"
for cfg in "1 8192 v4k8" "8 4096 v4k4"; do
  set -- $cfg
  APRIEL_SCAN_FWD=$3 ncu_profile "$OUT/ncu_scan_fwd.txt" "b$1 L$2 $3" 120 mixer_scan_fwd4 2 1 \
    --section ComputeWorkloadAnalysis -- python3 scripts/diag/scan_case.py "$1" "$2"
done
ncu_summary "$OUT/ncu_scan_fwd.txt" "Theoretical Occupancy|Block Limit" 120
