#!/usr/bin/env bash
# ncu source counters per SASS instruction of one mixer scan forward launch (stall reasons, executed counts,
# shared wavefronts per instruction), for docs/notes/scan.md's attribution tables.
# Usage on the device (after the in-place build):
#   bash scripts/diag/scan_fwd_sass_ncu.sh OUT VERSION B L KERNEL_REGEX [--packed]
#   e.g. bash scripts/diag/scan_fwd_sass_ncu.sh $OUT v7 8 4096 mixer_scan_fwd7
# --packed: packed documents (scan_case.documents); the outputs get a _packed suffix.
# Writes OUT/fwd_VERSION_b{B}_details.txt (headline sections) and OUT/fwd_VERSION_b{B}_sass.csv.gz.
set -uo pipefail
OUT=$1 VERSION=$2 B=$3 L=$4 REGEX=$5 PACKED=${6:-}
source "$(dirname "$0")/ncu_common.sh"
tag="$OUT/fwd_${VERSION}_b${B}"
[ "$PACKED" = "--packed" ] && tag="${tag}_packed"
APRIEL_SCAN_FWD=$VERSION timeout 240 "$NCU" --clock-control none --kernel-name "regex:$REGEX" --launch-skip 2 \
  --launch-count 1 "${NCU_SECTIONS[@]}" --section ComputeWorkloadAnalysis --section SourceCounters \
  --import-source yes -o "$tag" python3 scripts/diag/scan_case.py "$B" "$L" $PACKED > "$tag.log" 2>&1
"$NCU" -i "$tag.ncu-rep" --page details > "${tag}_details.txt" 2>&1
"$NCU" -i "$tag.ncu-rep" --page source --csv --print-source sass 2>/dev/null | gzip > "${tag}_sass.csv.gz"
# with the CUDA source lines interleaved (-lineinfo builds): where an instruction's shared-memory conflicts come from
"$NCU" -i "$tag.ncu-rep" --page source --csv --print-source cuda,sass 2>/dev/null | gzip > "${tag}_cuda_sass.csv.gz"
rm -f "$tag.ncu-rep"
ncu_summary "${tag}_details.txt"
