#!/usr/bin/env bash
# ncu source counters per SASS instruction of one mixer scan BACKWARD kernel launch (the backward twin of
# scan_fwd_sass_ncu.sh). Usage on the device (after the in-place build):
#   bash scripts/diag/scan_bwd_sass_ncu.sh OUT VERSION B L KERNEL_REGEX
#   e.g. bash scripts/diag/scan_bwd_sass_ncu.sh $OUT v7 8 4096 mixer_scan_bwd7
# Writes OUT/bwd_VERSION_b{B}_details.txt (headline sections) and OUT/bwd_VERSION_b{B}_sass.csv.gz.
set -uo pipefail
OUT=$1 VERSION=$2 B=$3 L=$4 REGEX=$5
source "$(dirname "$0")/ncu_common.sh"
tag="$OUT/bwd_${VERSION}_b${B}"
APRIEL_SCAN_BWD=$VERSION timeout 300 "$NCU" --clock-control none --kernel-name "regex:$REGEX" --launch-skip 2 \
  --launch-count 1 "${NCU_SECTIONS[@]}" --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section SourceCounters --import-source yes -o "$tag" python3 scripts/diag/scan_case.py "$B" "$L" --backward \
  > "$tag.log" 2>&1
"$NCU" -i "$tag.ncu-rep" --page details > "${tag}_details.txt" 2>&1
"$NCU" -i "$tag.ncu-rep" --page source --csv --print-source sass 2>/dev/null | gzip > "${tag}_sass.csv.gz"
# the same counters with the CUDA source lines interleaved (the kernels build with -lineinfo): where a SASS
# instruction's shared-memory conflicts come from (session 28)
"$NCU" -i "$tag.ncu-rep" --page source --csv --print-source cuda,sass 2>/dev/null | gzip > "${tag}_cuda_sass.csv.gz"
rm -f "$tag.ncu-rep"
ncu_summary "${tag}_details.txt"
