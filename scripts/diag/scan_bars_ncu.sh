#!/usr/bin/env bash
# ncu profile of the kernels the mixer scan's bars time (issue 3), the default dispatch at each bar shape, one launch
# each: the forward (b1 L8192: v5 K = 8 with TMA; b8 L4096: v7), the backward v7 (b1 L8192: the split's main kernel;
# b8 L4096) and the split's carry pre-pass (b1 L8192).
# Usage on the device (after the extension is built in place): bash scripts/diag/scan_bars_ncu.sh $OUT
# Writes $OUT/ncu_scan_bars.txt: issue activity, warp states and stall reasons, instruction counts, occupancy.
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
source "$(dirname "$0")/ncu_common.sh"
F="$OUT/ncu_scan_bars.txt"
ncu_profile "$F" "fwd b1 L8192" 120 mixer_scan_fwd4 2 1 -- python3 scripts/diag/scan_case.py 1 8192
ncu_profile "$F" "fwd b8 L4096" 120 mixer_scan_fwd7 2 1 -- python3 scripts/diag/scan_case.py 8 4096
ncu_profile "$F" "bwd b1 L8192" 180 mixer_scan_bwd7_kernel 2 1 -- python3 scripts/diag/scan_case.py 1 8192 --backward
ncu_profile "$F" "bwd carry b1 L8192" 180 mixer_scan_bwd7_carry 2 1 -- python3 scripts/diag/scan_case.py 1 8192 --backward
ncu_profile "$F" "bwd b8 L4096" 240 mixer_scan_bwd7_kernel 2 1 -- python3 scripts/diag/scan_case.py 8 4096 --backward
ncu_summary "$F" "Stall|stall|Theoretical Occupancy|Block Limit" 200
