# Sourced by the scripts/diag/*_ncu.sh profiles (run from the repository root on the device, after the
# in-place build): the ncu binary, the common section set, one profiled launch per call, the summary grep.
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NCU_SECTIONS=(--section SpeedOfLight --section SchedulerStats --section WarpStateStats --section InstructionStats
              --section Occupancy --section LaunchStats)
NCU_SUMMARY="===|Duration|DRAM Throughput|L2 Cache Throughput|Issue Slots Busy|Executed Ipc A|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|Executed Instructions  |Registers Per|Achieved Occupancy|Waves Per SM"

# ncu_profile FILE LABEL TIMEOUT KERNEL_REGEX LAUNCH_SKIP LAUNCH_COUNT [more ncu args ...] -- COMMAND ...
# Appends "=== LABEL" and the report of the selected launches to FILE (clocks left as they are).
ncu_profile() {
  local file=$1 label=$2 limit=$3 regex=$4 skip=$5 count=$6
  shift 6
  local extra=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do extra+=("$1"); shift; done
  shift
  echo "=== $label" >> "$file"
  # shellcheck disable=SC2086  # NCU_EXTRA_SECTIONS is a word list on purpose
  timeout "$limit" "$NCU" --clock-control none --kernel-name "regex:$regex" --launch-skip "$skip" \
    --launch-count "$count" "${NCU_SECTIONS[@]}" "${extra[@]}" ${NCU_EXTRA_SECTIONS:-} "$@" >> "$file" 2>&1
}

# ncu_summary FILE [EXTRA_REGEX] [LINES]: the headline metrics of every profiled launch in FILE.
ncu_summary() {
  grep -E "${NCU_SUMMARY}${2:+|$2}" "$1" | head -"${3:-150}"
}
