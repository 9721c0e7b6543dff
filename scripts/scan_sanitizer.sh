#!/usr/bin/env bash
# compute-sanitizer memcheck + racecheck of the mixer scan kernels (forward and backward) on tiny shapes:
# odd length (crosses a tile boundary, tail tile), packed documents, initial states, both repeat settings,
# for each forward version (APRIEL_SCAN_FWD).
# Usage (device machine, after the extension is built): bash scripts/scan_sanitizer.sh [out_dir]
set -uo pipefail
# Every tensor its own cudaMalloc: with torch's caching allocator, an access past a tensor but inside the allocator's
# segment is invisible to memcheck (session 13: a read past dfinal_conv in the v7 backward went unseen that way
# until, in a long test run, an allocation happened to end at an unmapped page).
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
OUT_DIR=${1:-${OUT:-/tmp/out}}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the repository root
mkdir -p "$OUT_DIR"
CASE=$(mktemp /tmp/scan_sanitizer_case.XXXX.py)
cat > "$CASE" <<'PY'
import os

import torch
from apriel_kernels import mixer_scan

torch.manual_seed(0)
for repeat in (True, False):
    b, L, R = 2, int(os.environ.get("SCAN_SANITIZER_L", "45")), 8
    D, X = int(os.environ.get("SCAN_SANITIZER_D", "64")), int(os.environ.get("SCAN_SANITIZER_X", "16"))
    zxbc = torch.randn(b, L, 2 * D + 2 * X, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dt_low = torch.randn(b, L, R, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cc = D if repeat else X
    params = [torch.randn(cc, 4, device="cuda") * 0.5, torch.randn(cc, device="cuda") * 0.1,
              torch.randn(D, R, device="cuda") * 0.3, torch.full((D,), -2.0, device="cuda"),
              torch.randn(D, 16, device="cuda") * 0.1, torch.randn(D, device="cuda")]
    for p in params:
        p.requires_grad_(True)
    seq = torch.zeros(b, L, dtype=torch.int32, device="cuda")
    for cut in (20, 128, 129, 160, 200):  # (see v7pc below)
        seq[:, cut:] += 1
    if os.environ.get("SCAN_SANITIZER_PACKED", "1") == "0":
        seq = None
    init_ssm = torch.randn(b, D // 16, 16, 16, device="cuda", requires_grad=True)
    init_conv = torch.randn(b, X, 3, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, ssm, conv = mixer_scan(zxbc, dt_low, *params, d_inner=D, d_xb=X, d_state=16, repeat_kv_before_conv=repeat,
                              initial_ssm_state=init_ssm, initial_conv_state=init_conv, seq_idx=seq,
                              return_final_states=True)
    (y.float().square().sum() + ssm.sum() + conv.float().sum()).backward()
torch.cuda.synchronize()
print("scan sanitizer case ok")
PY
LOG="$OUT_DIR/scan_sanitizer.log"
: > "$LOG"
# every forward version (v4 K = 8 is the default at these sizes; K = 4; v3; session 4: v5 K = 4 / 8), each
# followed by the backward. SCAN_SANITIZER_VERSIONS narrows the list (e.g. "v5k4 v5k8" for a short run).
# session 5: v7 (tensor cores), on the case without documents so that v7 itself runs; session 6: its backward is
# the v7 backward (APRIEL_SCAN_BWD=v7, the fused group-sum path: 4 heads per group), the others run the default.
# session 7: v7 runs the backward's sequence split there (2 segments: the carry pre-pass kernel and per-segment
# blocks); v7s1 is the same with APRIEL_SCAN_BWD_SEGMENTS=1 (the unsplit v7 backward).
# session 11: v5k8t = v5 K = 8 without documents, so that its TMA kernel (the pipelined schedule: 3 raw tiles)
# runs - v5k8 runs packed documents, which take the cp.async kernel - over 5 tiles (L 130: every raw slot twice).
# session 12: v7c = v7 over 10 tiles in 2 segments, so that the carry pre-pass's groups walk 2, 2, 1 and 0 tiles
# (its pipelined schedule's buffer hand-offs; the v7 case gives every group at most one tile); v7p = the v7 forward
# with packed documents (its document ids staged by cp.async next to the tile), backward v4.
# session 13: the v7 backward takes documents, so v7p's backward is v7 now (unsplit: 5 tiles), as is the other packed
# cases' (bwd=auto); v7pc = the v7 forward + the split backward with documents over 10 tiles in 2 segments of 5 (the
# carry pre-pass's document resets; document starts at 128 (a tile edge), 129 (a one-token document), 160 (the
# segment boundary) and 200).
# Also session 13: v5k8 (packed) runs the TMA v5 K = 8 kernel now, which takes documents; v5k8p = the same over 10
# tiles (the pipelined schedule's next-tile document masks across every raw slot, the starts listed above).
# session 17: v7var = the varlen v7 forward (APRIEL_SCAN_FWD=v7var: blocks over (group, document), the plan kernel)
# over 10 tiles with the starts above (a document ending on a tile edge, a one-token document); v7var1 = the same
# with one block per group (APRIEL_SCAN_VARLEN_BLOCKS=1), which then takes all 12 documents in turn (the staging
# barriers' phases run on across documents).
# session 18: v7pc4 = v7pc in 4 segments of 3 tiles, so that the carry pre-pass stops at a first document start
# inside a segment (128 in tiles 3 .. 5: its groups take tiles 3 and 4; 200 in tiles 6 .. 8) or scans a segment
# without one (tiles 9 ..), and the backward's epilogue copy without document tests runs next to the one with them.
# session 19: v7r3 = the v7 forward and backward with 3 heads per group (D 48: the block's 4th warp has no head; its
# z / C / dy boxes are head 0's again) with documents, over 5 tiles in 2 segments (the carry pre-pass); v7r3c = the
# same without documents, unsplit, with cp.async staging (APRIEL_SCAN_TMA=0: the missing head's copies, whose C
# columns lie past the row, are zero-filled, not read). v7r5 = D 80 (5 heads per group: blocks of 3 + 2 heads, the
# even split) with documents, 2 segments, TMA.
# session 20: the v7 backward's kSpan (blocks of 4 consecutive heads across group boundaries) replaced the backward's
# kPartial in v7r3 / v7r3c / v7r5 (one group: blocks of 3, or 4 and 1 heads); v7r3s = D 96 / X 32 (3 heads per group,
# two groups: blocks of 3 + 1 and 2 + 2 heads, the second group's x / B slices and halo) with documents, 2 segments,
# TMA; v7r3sc = the same without documents, unsplit, cp.async; v7r2f = D 128 / X 64 (2 heads per group: two whole
# groups per block, the group sums in the kernel) with documents, 2 segments (the dx_edge rows), TMA.
# session 21: dB / d(conv input) in group parts (one per block and group) wherever the sums are not fused: v7r3s /
# v7r5 write them; v7r8 = D 128 (8 heads per group: the kSpan kernel, two blocks / parts per group) with documents,
# 2 segments (the halo rows the head-sum kernel adds), TMA.
# session 23: the varlen forward for heads per group % 4 != 0 (kPartial block columns): v7varr3 = D 48 (one column of 3
# heads: the 4th warp's boxes and its skipped stores) over 10 tiles, TMA; v7varr5 = D 80 (columns of 3 + 2 heads) with
# one block per column (APRIEL_SCAN_VARLEN_BLOCKS=1: every document in turn), cp.async (APRIEL_SCAN_TMA=0).
# session 24: the v7 backward for one head per group (kMulti): v7r1 = D 128 / X 128 (two blocks of 4 groups; groups
# 1-3's x / B read from global memory, single-parity xf / bop) with documents, 2 segments, TMA; v7r1c = the same
# without documents, unsplit, cp.async.
# session 30: the sub-chunk checkpoints (APRIEL_SCAN_CKPT=sub-always: the kSubCk forward writes them, the kSubCk
# backward loads them): v7sub = without documents, 2 segments; v7subp = with documents, unsplit; v7subr3 = 3 heads per
# group (D 96 / X 32: the forward's kPartial, the backward's kSpan), 2 segments; v7subr1 = one head per group (the
# forward writes them, the kMulti backward, which has no sub-chunk variant, ignores them).
# session 31: the v5 forward writing them: v5subk8 = K = 8 with TMA staging, v5subk4 = K = 4 (cp.async), v5subk8p =
# K = 8 with documents; v7varsub = the varlen v7 writing them (documents, each row by the block holding its token).
ALL_VERSIONS="v4k8 v4k4 v3 v5k4 v5k8 v5k8t v5k8p v7 v7s1 v7c v7p v7pc v7pc4 v7var v7var1 v7r3 v7r3c v7r5 v7r3s v7r3sc"
ALL_VERSIONS+=" v7r2f v7r8 v7varr3 v7varr5 v7r1 v7r1c v7sub v7subp v7subr3 v7subr1 v5subk8 v5subk4 v5subk8p v7varsub"
for version in ${SCAN_SANITIZER_VERSIONS:-$ALL_VERSIONS}; do
  packed=1 bwd=auto fwd=$version segments= vblocks= dinner=64 dxb=16 tma= ckpt=
  [ "$version" = "v7" ] && packed=0 bwd=v7
  [ "$version" = "v7s1" ] && packed=0 bwd=v7 fwd=v7 segments=1
  length=45
  [ "$version" = "v5k8t" ] && packed=0 fwd=v5k8 length=130
  [ "$version" = "v5k8p" ] && fwd=v5k8 length=300
  [ "$version" = "v7c" ] && packed=0 bwd=v7 fwd=v7 segments=2 length=300
  [ "$version" = "v7p" ] && fwd=v7 length=130
  [ "$version" = "v7pc" ] && bwd=v7 fwd=v7 segments=2 length=300
  [ "$version" = "v7pc4" ] && bwd=v7 fwd=v7 segments=4 length=300
  [ "$version" = "v7var" ] && fwd=v7var length=300
  [ "$version" = "v7var1" ] && fwd=v7var length=300 vblocks=1
  [ "$version" = "v7r3" ] && fwd=v7 bwd=v7 segments=2 length=130 dinner=48
  [ "$version" = "v7r3c" ] && fwd=v7 bwd=v7 segments=1 length=130 dinner=48 packed=0 tma=0
  [ "$version" = "v7r5" ] && fwd=v7 bwd=v7 segments=2 length=130 dinner=80
  [ "$version" = "v7r3s" ] && fwd=v7 bwd=v7 segments=2 length=130 dinner=96 dxb=32
  [ "$version" = "v7r3sc" ] && fwd=v7 bwd=v7 segments=1 length=130 dinner=96 dxb=32 packed=0 tma=0
  [ "$version" = "v7r2f" ] && fwd=v7 bwd=v7 segments=2 length=130 dinner=128 dxb=64
  [ "$version" = "v7r8" ] && fwd=v7 bwd=v7 segments=2 length=130 dinner=128
  [ "$version" = "v7varr3" ] && fwd=v7var length=300 dinner=48
  [ "$version" = "v7varr5" ] && fwd=v7var length=300 dinner=80 vblocks=1 tma=0
  [ "$version" = "v7r1" ] && fwd=v7 bwd=v7 segments=2 length=130 dinner=128 dxb=128
  [ "$version" = "v7r1c" ] && fwd=v7 bwd=v7 segments=1 length=130 dinner=128 dxb=128 packed=0 tma=0
  [ "${version:0:5}" = "v7sub" ] && fwd=v7 bwd=v7 segments=2 length=130 packed=0 ckpt=sub-always
  [ "$version" = "v7subp" ] && segments=1 packed=1
  [ "$version" = "v7subr3" ] && dinner=96 dxb=32
  [ "$version" = "v7subr1" ] && dinner=128 dxb=128
  [ "${version:0:5}" = "v5sub" ] && fwd=v5${version:5:2} bwd=v7 segments=2 length=130 packed=0 ckpt=sub-always
  [ "$version" = "v5subk8p" ] && packed=1
  [ "$version" = "v7varsub" ] && fwd=v7var bwd=v7 segments=2 length=300 ckpt=sub-always
  for tool in memcheck racecheck; do
    echo "=== L=$length D=$dinner X=$dxb packed=$packed APRIEL_SCAN_TMA=${tma:-auto} APRIEL_SCAN_FWD=$fwd" \
      "APRIEL_SCAN_BWD=$bwd APRIEL_SCAN_BWD_SEGMENTS=${segments:-auto} APRIEL_SCAN_VARLEN_BLOCKS=${vblocks:-auto}" \
      "APRIEL_SCAN_CKPT=${ckpt:-tile} compute-sanitizer --tool $tool" >> "$LOG"
    SCAN_SANITIZER_L=$length SCAN_SANITIZER_D=$dinner SCAN_SANITIZER_X=$dxb SCAN_SANITIZER_PACKED=$packed APRIEL_SCAN_TMA=$tma APRIEL_SCAN_FWD=$fwd APRIEL_SCAN_BWD=$bwd APRIEL_SCAN_BWD_SEGMENTS=$segments \
      APRIEL_SCAN_VARLEN_BLOCKS=$vblocks APRIEL_SCAN_CKPT=$ckpt \
      compute-sanitizer --tool $tool --kernel-name kns=mixer_scan python3 "$CASE" >> "$LOG" 2>&1
    echo "=== $tool rc=$?" >> "$LOG"
  done
done
grep -E "^=== |ERROR SUMMARY|RACECHECK SUMMARY|scan sanitizer case ok" "$LOG"
