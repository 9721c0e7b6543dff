#!/usr/bin/env bash
# ncu profile of the causal conv1d forward and backward (issue 2) at the bar shape (b1 L8192 4096 ch, bf16,
# silu, token-major), one launch each, default kernels. Usage on the device after the in-place build:
#   bash scripts/diag/conv1d_ncu.sh $OUT      -> $OUT/ncu_conv1d.txt (+ a grep summary on stdout)
set -uo pipefail
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
source "$(dirname "$0")/ncu_common.sh"
CASE=$(mktemp /tmp/conv_once.XXXX.py)
cat > "$CASE" <<'PY'
import sys, torch
from apriel_kernels import causal_conv1d_fn
dim = int(sys.argv[1])
x = torch.randn(1, 8192, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # token-major storage
w = torch.randn(dim, 4, device="cuda", dtype=torch.bfloat16) * 0.5
b = torch.randn(dim, device="cuda", dtype=torch.bfloat16) * 0.1
x.requires_grad_(True)
for _ in range(4):
    y = causal_conv1d_fn(x, w, b, activation="silu")
    y.backward(torch.ones_like(y))
torch.cuda.synchronize()
PY
for dim in 4096 1024; do
  ncu_profile "$OUT/ncu_conv1d.txt" "dim $dim" 150 "fwd_|bwd_" 4 2 --section MemoryWorkloadAnalysis -- \
    python3 "$CASE" "$dim"
done
ncu_summary "$OUT/ncu_conv1d.txt" "  [a-z_:]*(fwd|bwd)_[a-z_]*kernel|Grid Size|Block Size" 120
