#!/usr/bin/env bash
# One device call: build the extension in place, run the GPU tests, run benchmarks; logs and results go
# under $OUT (the device tool brings them back). Usage on the device machine:
#   bash scripts/gpu_run.sh [families=all] [pytest -k expr] [bench command...]
# e.g. bash scripts/gpu_run.sh conv1d "conv1d" "python -m bench kernels --only conv1d"
set -uo pipefail
FAMILIES=${1:-all}
TEST_K=${2:-}
shift 2 2>/dev/null || shift $#
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} APRIEL_KERNELS_CUDA_ARCHS=${APRIEL_KERNELS_CUDA_ARCHS:-9.0}
export APRIEL_KERNELS_REQUIRE_CUDA=1
source "$(dirname "$0")/device_cutlass.sh"  # APRIEL_CUTLASS_DIR for the TMA staging
[ "$FAMILIES" != "all" ] && export APRIEL_KERNELS_FAMILIES=$FAMILIES
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
start=$(date +%s.%N)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
rc=$?
end=$(date +%s.%N)
python3 -c "print('build_seconds %.1f rc $rc' % ($end - $start))" | tee -a "$OUT/gpu.txt"
if [ $rc -ne 0 ]; then tail -60 "$OUT/build.log"; exit $rc; fi
grep -E "registers|spill|smem" "$OUT/build.log" | sort | uniq | head -40 > "$OUT/ptxas.txt" || true
# per-TU compile times (ninja's log: start / end ms, target), to see the build's critical path
cat build/temp*/.ninja_log > "$OUT/ninja_log.txt" 2>/dev/null || true
python3 -c "import apriel_kernels, json; print(json.dumps(apriel_kernels.info()))" | tee -a "$OUT/gpu.txt"
if [ "$TEST_K" = "none" ]; then
  echo "GPU tests skipped (TEST_K=none)"
elif [ -n "$TEST_K" ]; then
  python3 -m pytest tests -m gpu -k "$TEST_K" -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
else
  python3 -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
fi
if [ $# -gt 0 ]; then
  bash -c "$*" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
