#!/usr/bin/env bash
# The v7 forward's MUFU-relief variants (session 15; the fwd b8 L4096 bar; none measured yet): built side by side
# (5 concurrent scan-family builds, ~2 min) and timed in one device call, interleaved over 2 rounds, then the v7
# forward's tests in every variant (round 2). Per 16-token half and lane (cuobjdump of the TMA kernel's scan loop,
# bf16): instructions / MUFU ops
#   base  1,180 / 160   (session 14: ex2_fma on 1 of 8 scan exponentials)
#   poly  1,174 / 152   softplus_poly: delta with one MUFU op (a degree-7 polynomial on the FMA pipe)
#   ppf   1,207 / 144   + sigmoid_pair: the item's two sigmoids with one reciprocal
#   pp    1,064 / 160   poly + pair, all 8 scan exponentials on MUFU (no ex2_fma)
#   ppfc  1,161 / 144   ppf + the C operand unpacked to fp32 once in the prep (APRIEL_SCAN_FWD7_C_F32: one LDS.128 per
#                       token instead of 4 unpacks; 56,208 bytes of shared memory per block, 4 blocks per SM still)
# A warp's MUFU op holds its SFU quarter for 8 cycles, so a half costs at least max(instructions, 8 x MUFU) issue
# cycles per warp: 1,280 / 1,216 / 1,207 / 1,280 / 1,161.
# Run from the repository root (a .snap export) on the device machine: OUT=$OUT/ab bash scripts/diag/ab_fwd7_mufu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
bash scripts/diag/build_ab.sh -r 2 \
  base="-DAPRIEL_SCAN_FWD7_PAIR_RCP=0 -DAPRIEL_SCAN_FWD7_SOFTPLUS_POLY=0" \
  poly="-DAPRIEL_SCAN_FWD7_SOFTPLUS_POLY=1" \
  ppf="-DAPRIEL_SCAN_FWD7_PAIR_RCP=1 -DAPRIEL_SCAN_FWD7_SOFTPLUS_POLY=1" \
  pp="-DAPRIEL_SCAN_FWD7_PAIR_RCP=1 -DAPRIEL_SCAN_FWD7_SOFTPLUS_POLY=1 -DAPRIEL_SCAN_FWD7_EX2FMA=0" \
  ppfc="-DAPRIEL_SCAN_FWD7_PAIR_RCP=1 -DAPRIEL_SCAN_FWD7_SOFTPLUS_POLY=1 -DAPRIEL_SCAN_FWD7_C_F32=1" \
  -- 'python3 scripts/diag/scan_fwd_time.py --versions auto --shapes 8x4096,4x4096 --packed \
        --json $OUT/t_${LABEL}_r$ROUND.json
      if [ "$ROUND" = 2 ]; then
        python3 -m pytest tests/test_mixer_scan.py -q -p no:cacheprovider \
          -k "forward_v7 or forward_parity or packed_equals or forward_tma" 2>&1 | tail -2
      fi'
