#!/usr/bin/env bash
# compute-sanitizer memcheck + racecheck of the decode-step kernels on a small H1-like shape: v2, v3 with the
# tensor-map state copies and staged conv rows (default), v3 per-lane copies; fp32 and bf16 state; padding rows
# and permuted slots, several rows per warp (the v3 ring wraps).
# Usage (device machine, after the extension is built): bash scripts/step_sanitizer.sh [out_dir]
set -uo pipefail
# Every tensor its own cudaMalloc: with torch's caching allocator, an access past a tensor but inside the allocator's
# segment is invisible to memcheck (session 13: a read past dfinal_conv in the v7 backward went unseen that way
# until, in a long test run, an allocation happened to end at an unmapped page).
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
OUT_DIR=${1:-${OUT:-/tmp/out}}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"
CASE=$(mktemp /tmp/step_sanitizer_case.XXXX.py)
cat > "$CASE" <<'PY'
import torch
from apriel_kernels import mixer_step

torch.manual_seed(0)
D, X, N, R, W, batch, slots = 512, 128, 16, 16, 4, 67, 80
dev, act = "cuda", torch.bfloat16
params = [torch.randn(D, W, device=dev, dtype=act) * 0.5, torch.randn(D, device=dev, dtype=act) * 0.2,
          torch.randn(D, R, device=dev, dtype=act) * R ** -0.5, torch.rand(D, device=dev, dtype=act) * 2.5 - 2.0,
          torch.log(torch.arange(1, N + 1, device=dev, dtype=torch.float32)).repeat(D, 1), torch.randn(D, device=dev)]
slot_idx = torch.randperm(slots, device=dev)[:batch].to(torch.int32)
slot_idx[::7] = -1  # padding rows
for state_dtype in (torch.float32, torch.bfloat16):
    conv = torch.randn(slots, X, W - 1, device=dev).to(act)
    ssm = torch.randn(slots, D // N, N, N, device=dev).to(state_dtype)
    for _ in range(3):
        zxbc = torch.randn(batch, 1, 2 * D + 2 * X, device=dev, dtype=act)
        dt_low = torch.randn(batch, 1, R, device=dev, dtype=act)
        y = mixer_step(zxbc, dt_low, conv, ssm, slot_idx, *params, d_inner=D, d_xb=X, d_state=N)
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
print("case done")
PY
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
for cfg in "v2 1 1 4" "v3 1 1 4" "v3 1 1 2" "v3 0 0 4"; do
  set -- $cfg
  for tool in memcheck racecheck; do
    echo "=== APRIEL_STEP_KERNEL=$1 APRIEL_STEP_V3_TMA=$2 APRIEL_STEP_V3_CONV_STAGE=$3 APRIEL_STEP_V3_SEQ=$4 $tool" | tee -a "$OUT_DIR/step_sanitizer.log"
    APRIEL_STEP_KERNEL=$1 APRIEL_STEP_V3_TMA=$2 APRIEL_STEP_V3_CONV_STAGE=$3 APRIEL_STEP_V3_SEQ=$4 \
      timeout 300 "$SAN" --tool "$tool" python3 "$CASE" >> "$OUT_DIR/step_sanitizer.log" 2>&1
    echo "=== $tool rc=$?" | tee -a "$OUT_DIR/step_sanitizer.log"
  done
done
grep -E "^===|ERROR SUMMARY|RACECHECK SUMMARY|case done" "$OUT_DIR/step_sanitizer.log"
