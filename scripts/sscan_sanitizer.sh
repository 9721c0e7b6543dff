#!/usr/bin/env bash
# compute-sanitizer memcheck + racecheck of the generic selective scan's forward v7 and backward v7
# (csrc/sscan/sscan_fwd7.cuh, sscan_bwd7.cuh) on tiny shapes: 3 tiles with a tail, 2 blocks, initial states, z, each
# staging - channel-major (kFast token-fast; dy channel-major, read in place), token-major (kFast token-major),
# NaN-padded slices (v2's generic staging; the backward v2 there) - and both preps.
# Usage (device machine, after the extension is built): bash scripts/sscan_sanitizer.sh [out_dir]
set -uo pipefail
export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # every tensor its own allocation: memcheck sees reads past a tensor
OUT_DIR=${1:-${OUT:-/tmp/out}}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the repository root
mkdir -p "$OUT_DIR"
CASE=$(mktemp /tmp/sscan_sanitizer_case.XXXX.py)
cat > "$CASE" <<'PY'
import os

import torch
from apriel_kernels import selective_scan

b, L, D, N = 2, 88, 128, 16  # (L % 8 == 0: channel-major rows take 16-byte copies)
g = torch.Generator(device="cuda").manual_seed(0)
rnd = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731


def layout(t, kind):
    """t (b, L, C...) token-major values -> the same values as a channel-major view, token-major, or a NaN-padded
    slice (no 16-byte copies: v2's generic staging)."""
    if kind == "cm":
        perm = (0, 2, 1) if t.dim() == 3 else (0, 2, 3, 1)
        inv = (0, 2, 1) if t.dim() == 3 else (0, 3, 1, 2)
        return t.permute(*perm).contiguous().permute(*inv)
    if kind == "tm":
        return t.contiguous()
    base = torch.full((*t.shape[:-1], t.shape[-1] + 3), float("nan"), dtype=t.dtype, device=t.device)
    base[..., 1:1 + t.shape[-1]] = t
    return base[..., 1:1 + t.shape[-1]]


for kind in ("cm", "tm", "nan"):
    acts = dict(u=rnd(b, L, D), delta=rnd(b, L, D) - 2.0, B=rnd(b, L, 1, N), C=rnd(b, L, 1, N), z=rnd(b, L, D))
    acts = {k: layout(v.to(torch.bfloat16), kind).requires_grad_(True) for k, v in acts.items()}
    A = (-torch.exp(0.3 * rnd(D, N))).requires_grad_(True)
    Dp, bias = rnd(D).requires_grad_(True), (0.1 * rnd(D)).requires_grad_(True)
    init = rnd(b, D, N).requires_grad_(True)
    y, last = selective_scan(acts["u"], acts["delta"], A, acts["B"], acts["C"], D=Dp, z=acts["z"], delta_bias=bias,
                             delta_softplus=True, initial_state=init, return_final_state=True)
    yl = y.transpose(1, 2).contiguous().transpose(1, 2) if kind == "cm" else y  # (cm: dy arrives channel-major)
    (yl.float().square().sum() + last.sum()).backward()
torch.cuda.synchronize()
print("sscan sanitizer case ok")
PY
LOG="$OUT_DIR/sscan_sanitizer.log"
: > "$LOG"
# Session 27: the v7 sequence splits - by default here the forward's 2 segments (2 + 1 tiles: the state pre-pass, the
# folded entering state) and the backward's 3 segments of one tile each (the carry pre-pass, its groups with one tile
# or none, the per-segment rows) - and unsplit (APRIEL_SSCAN_FWD_SEGMENTS=1, APRIEL_SSCAN_BWD_SEGMENTS=1).
for segments in auto 1; do
  for prep in fast precise; do
    for tool in memcheck racecheck; do
      echo "=== APRIEL_SSCAN_FWD=v7 APRIEL_SSCAN_BWD=v7 segments=$segments prep=$prep $tool" | tee -a "$LOG"
      SOFT="" SEGS=""
      [ "$prep" = precise ] && SOFT=precise
      [ "$segments" != auto ] && SEGS=$segments
      APRIEL_SSCAN_FWD=v7 APRIEL_SSCAN_BWD=v7 APRIEL_SSCAN_SOFTPLUS=$SOFT \
        APRIEL_SSCAN_FWD_SEGMENTS=$SEGS APRIEL_SSCAN_BWD_SEGMENTS=$SEGS \
        compute-sanitizer --tool "$tool" python3 "$CASE" 2>&1 \
        | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|case ok|Error|error" | tee -a "$LOG"
    done
  done
done
rm -f "$CASE"
