#!/usr/bin/env bash
# ncu of the three sequence-split pre-passes at batch 1 L 8192 (D 4096): the selective scan's forward state pre-pass
# and backward carry pre-pass, and the mixer scan's backward carry pre-pass (session 28: how far from the MUFU rate
# they run, and why). Usage on the device (after the in-place build): bash scripts/diag/prepass_ncu.sh $OUT
# Writes $OUT/ncu_prepass.txt (the full reports) and prints the headline metrics.
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
source "$(dirname "$0")/ncu_common.sh"
F="$OUT/ncu_prepass.txt"
X=(--section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --metrics
   sm__pipe_xu_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.sum,\
sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,\
sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,\
smsp__inst_executed.sum)
ncu_profile "$F" "sscan fwd state pre-pass b1 L8192" 180 sscan_fwd7_state 1 1 "${X[@]}" -- \
  python3 scripts/diag/sscan_bwd_profile.py --forward --batch 1 --seqlen 8192 --versions auto
ncu_profile "$F" "sscan fwd main b1 L8192" 180 sscan_fwd7_kernel 1 1 "${X[@]}" -- \
  python3 scripts/diag/sscan_bwd_profile.py --forward --batch 1 --seqlen 8192 --versions auto
ncu_profile "$F" "sscan bwd carry pre-pass b1 L8192" 180 sscan_bwd7_carry 1 1 "${X[@]}" -- \
  python3 scripts/diag/sscan_bwd_profile.py --batch 1 --seqlen 8192 --versions auto
ncu_profile "$F" "mixer bwd carry pre-pass b1 L8192" 180 mixer_scan_bwd7_carry 1 1 "${X[@]}" -- \
  python3 scripts/diag/scan_case.py 1 8192 --backward
ncu_summary "$F" "pipe_|inst_executed.sum|Block Limit|Theoretical Occupancy" 200
