#!/usr/bin/env bash
# A/B of compile-time kernel settings in one device call: copies the tree once per variant, builds each copy in place
# with its own NVCC_APPEND_FLAGS (nvcc only: host .cpp files do not see them), then runs a command in every copy,
# the variants interleaved over rounds so machine drift spreads over all of them. Run from the repository root
# (e.g. a .snap export) on the device machine:
#   bash scripts/diag/build_ab.sh [-r ROUNDS] LABEL=FLAGS [LABEL=FLAGS ...] -- COMMAND
#   e.g. bash scripts/diag/build_ab.sh a=-DMY_FLAG=0 b=-DMY_FLAG=1 -- \
#          'python3 scripts/diag/scan_bwd_variants.py 0 --env APRIEL_AB_NOOP --json $OUT/bwd_${LABEL}_r$ROUND.json'
# COMMAND runs under bash in each copy with LABEL, ROUND and PYTHONPATH (= that copy) set; build logs go to
# $OUT/build_ab_LABEL.log (the trees build concurrently; a failed build stops the script). APRIEL_KERNELS_FAMILIES (default: scan) narrows the build.
# LABEL=@DIR builds the tree at DIR (e.g. another commit's export, relative to the repository root) without flags:
# an A/B of two versions of the code rather than of two settings.
set -uo pipefail
ROUNDS=1
if [ "${1:-}" = "-r" ]; then ROUNDS=$2; shift 2; fi
VARIANTS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do VARIANTS+=("$1"); shift; done
if [ $# -lt 2 ] || [ ${#VARIANTS[@]} -eq 0 ]; then
  echo "usage: build_ab.sh [-r ROUNDS] LABEL=FLAGS [LABEL=FLAGS ...] -- COMMAND" >&2
  exit 2
fi
shift
COMMAND=$*
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} APRIEL_KERNELS_CUDA_ARCHS=${APRIEL_KERNELS_CUDA_ARCHS:-9.0} APRIEL_KERNELS_REQUIRE_CUDA=1
export APRIEL_KERNELS_FAMILIES=${APRIEL_KERNELS_FAMILIES:-scan} PYTHONUNBUFFERED=1
SRC=$PWD
source "$(dirname "$0")/../device_cutlass.sh"  # APRIEL_CUTLASS_DIR for the TMA staging
# the trees build concurrently (a scan-family build is bound by its slowest translation unit, not by the cores)
for v in "${VARIANTS[@]}"; do
  label=${v%%=*} flags=${v#*=} src=$SRC
  if [ "${flags:0:1}" = "@" ]; then src=$(cd "$SRC/${flags:1}" && pwd) flags=""; fi
  tree=/tmp/build_ab_$label
  rm -rf "$tree" && mkdir -p "$tree" && (cd "$src" && tar --exclude=./build -cf - .) | tar -xf - -C "$tree"
  (start=$(date +%s)
   cd "$tree" && NVCC_APPEND_FLAGS="$flags" python3 setup.py build_ext --inplace > "$OUT/build_ab_$label.log" 2>&1
   rc=$?
   echo "build_ab: $label ($flags) build rc $rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/build_ab.txt"
   exit $rc) &
done
failed=0
for job in $(jobs -p); do wait "$job" || failed=1; done
if [ $failed -ne 0 ]; then
  for v in "${VARIANTS[@]}"; do tail -30 "$OUT/build_ab_${v%%=*}.log"; done
  exit 1
fi
for round in $(seq 1 "$ROUNDS"); do
  order=("${VARIANTS[@]}")
  if [ $((round % 2)) -eq 0 ]; then  # every other round in reverse order
    order=(); for ((i = ${#VARIANTS[@]} - 1; i >= 0; i--)); do order+=("${VARIANTS[$i]}"); done
  fi
  for v in "${order[@]}"; do
    label=${v%%=*}
    echo "build_ab: round $round $label" | tee -a "$OUT/build_ab.txt"
    (cd "/tmp/build_ab_$label" && LABEL=$label ROUND=$round PYTHONPATH="/tmp/build_ab_$label" bash -c "$COMMAND") 2>&1 \
      | tee -a "$OUT/build_ab.txt"
  done
done
