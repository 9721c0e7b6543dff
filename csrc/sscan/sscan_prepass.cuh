// The pieces of the selective scan's two sequence-split pre-passes (session 27): sscan7p (sscan_fwd7.cuh: every
// segment's end state and decay product, for the forward) and sscan7c (sscan_bwd7.cuh: every segment's starting carry
// and decay product, for the backward): the groups, barriers and fold of ../common/split_prepass.cuh (shared with the
// mixer's carry pre-pass, whose design they follow), and per group and 32-token tile the slots (16 rows x kT tokens
// each) in the main kernel's orientation.
#pragma once
#include "../common/split_prepass.cuh"  // prepass:: groups, group barriers, the fold
#include "sscan_fwd2.cuh"                // sscan2:: cp_async16 / commit; sscan:: kT, to_f

namespace apriel {
namespace sscanpp {

using sscan::kT;
using prepass::fold_groups;
using prepass::group_sync;
using prepass::group_tiles;
using prepass::kGroups;
using prepass::kGT;
using prepass::kThr;

// kBT slots: a row's 32 tokens are 4 octets of 16 bytes; octet o of row r sits at position o ^ octet_swizzle(r), so
// that the prep's 16-byte octet reads (8 consecutive rows, one octet) hit 8 different bank groups. (Session 28: with
// rows in place the prep read its 8 tokens one 2-byte element at a time, 8 rows of a quarter warp on 2 bank groups:
// both pre-passes ran at ~94 % of the shared-memory pipe, ncu in bench/results/s28/.)
__device__ __forceinline__ int octet_swizzle(int row) { return (row >> 1) & 3; }

// The tile at t0 of kNS slots into raw (no slot whose bit is set in skip), by 16-byte cp.async, zero-filled past L and
// where !have; commits. base / stride: each slot's row 0 token 0 and the stride of its copied rows - kBT: rows of
// tokens (the thread's piece: row tid / 4, octet tid % 4, swizzled), else token rows of 16 (token tid / 2, rows
// 8 (tid % 2) ..). The forward v7's fast stagings guarantee the 16-byte alignment (and the host dy's).
template <typename T, bool kBT, int kNS>
__device__ __forceinline__ void copy_tile(T (*raw)[16 * kT], const T* const (&base)[kNS],
                                          const int64_t (&stride)[kNS], unsigned skip, int tid, int t0, int L,
                                          bool have) {
  const int prow = kBT ? tid / 4 : 8 * (tid % 2), ptok = kBT ? 8 * (tid % 4) : tid / 2;
  const int dst = kBT ? prow * kT + 8 * ((tid % 4) ^ octet_swizzle(prow)) : ptok * 16 + prow, pos = t0 + ptok;
  const int n = !have ? 0 : kBT ? min(max(L - pos, 0), 8) : (pos < L ? 8 : 0);
#pragma unroll
  for (int s = 0; s < kNS; ++s) {
    if ((skip >> s) & 1u) continue;
    const T* src = kBT ? base[s] + prow * stride[s] + pos : base[s] + pos * stride[s] + prow;
    sscan2::cp_async16(raw[s] + dst, n > 0 ? src : base[s], n * (int)sizeof(T));
  }
  sscan2::cp_async_commit();
}

// Tokens 8 oct .. 8 oct + 7 of row `row` of a staged slot, as fp32: kBT one 16-byte load of the swizzled octet, else
// 8 loads (token rows).
template <typename T, bool kBT>
__device__ __forceinline__ void raw_octet(const T* slot, int row, int oct, float (&v)[8]) {
  static_assert(sizeof(T) == 2, "an octet of 16-bit values is one 16-byte load");
  if constexpr (kBT) {
    const uint4 w = *reinterpret_cast<const uint4*>(slot + row * kT + 8 * (oct ^ octet_swizzle(row)));
    const unsigned u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      T pair[2];
      memcpy(pair, &u[k], sizeof(u[k]));
      v[2 * k] = sscan::to_f(pair[0]);
      v[2 * k + 1] = sscan::to_f(pair[1]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = sscan::to_f(slot[(8 * oct + k) * 16 + row]);
  }
}

}  // namespace sscanpp
}  // namespace apriel
