#!/usr/bin/env bash
# Shared-memory wavefronts and bank conflicts of the issue-3 bar kernels (ncu, one launch each; session 28): the
# forward v7 at b8 L4096, the forward v5 K = 8 at b1 L8192, the backward v7 at b8 L4096 and at b1 L8192 (split).
# Usage on the device (after the in-place build): bash scripts/diag/scan_bank_ncu.sh $OUT [KERNELS]
# KERNELS: a comma-separated subset of fwd7,fwd5,bwd7,bwd7split (default: all four).
# Writes $OUT/ncu_bank.txt and prints, per kernel, the shared-memory wavefronts, the conflicts and the instructions.
set -uo pipefail
OUT=${1:-/tmp/out}
KERNELS=,${2:-fwd7,fwd5,bwd7,bwd7split},
mkdir -p "$OUT"
source "$(dirname "$0")/ncu_common.sh"
F="$OUT/ncu_bank.txt"
M=l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum
M=$M,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum
M=$M,smsp__inst_executed_op_shared_ld.sum,smsp__inst_executed_op_shared_st.sum,smsp__inst_executed.sum
M=$M,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,sm__cycles_elapsed.avg,gpu__time_duration.sum
M=$M,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio
M=$M,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio
prof() {  # KEY LABEL KERNEL_REGEX SKIP -- COMMAND ...
  local key=$1 label=$2 regex=$3 skip=$4
  shift 5
  [[ $KERNELS == *,$key,* ]] || return 0
  echo "=== $label" >> "$F"
  timeout 180 "$NCU" --clock-control none --kernel-name "regex:$regex" --launch-skip "$skip" --launch-count 1 \
    --metrics "$M" "$@" >> "$F" 2>&1
}
prof fwd7 "fwd v7 b8 L4096" mixer_scan_fwd7_kernel 2 -- python3 scripts/diag/scan_case.py 8 4096
prof fwd5 "fwd v5 K8 b1 L8192" mixer_scan_fwd4_kernel 2 -- python3 scripts/diag/scan_case.py 1 8192
prof bwd7 "bwd v7 b8 L4096" mixer_scan_bwd7_kernel 2 -- python3 scripts/diag/scan_case.py 8 4096 --backward
prof bwd7split "bwd v7 b1 L8192 (split)" mixer_scan_bwd7_kernel 2 -- python3 scripts/diag/scan_case.py 1 8192 --backward
grep -E "===|shared|inst_executed.sum|duration|stalled" "$F"
