// The groups of a sequence split's pre-pass block, shared by the three pre-passes: the mixer scan's carry pre-pass
// (mixer_scan_bwd7.cuh scan7c, session 7) and the selective scan's state / carry pre-passes (sscan_fwd7.cuh sscan7p,
// sscan_bwd7.cuh sscan7c, session 27). A block takes one head (16 channels x 16 states) of one segment with kGroups
// groups of kGT threads, each over a contiguous quarter of the segment's tiles; at the end the groups' partial values
// are folded in order.
#pragma once
#include "scan_math.cuh"  // ex2

namespace apriel {
namespace prepass {

constexpr int kGT = 64;  // threads per group
constexpr int kGroups = 4;
constexpr int kThr = kGT * kGroups;

// Named barrier 1 + gi of group gi's 64 threads (immediate ids: 5 barriers, not 16).
__device__ __forceinline__ void group_sync(int gi) {
  static_assert(kGroups == 4 && kGT == 64, "group_sync names barriers 1..4 of 64 threads");
  switch (gi) {
    case 0: asm volatile("bar.sync 1, 64;" ::: "memory"); break;
    case 1: asm volatile("bar.sync 2, 64;" ::: "memory"); break;
    case 2: asm volatile("bar.sync 3, 64;" ::: "memory"); break;
    default: asm volatile("bar.sync 4, 64;" ::: "memory"); break;
  }
}

// Group gi's tiles of the segment's tiles seg_first .. seg_last: a contiguous quarter, empty where first > last.
__device__ __forceinline__ void group_tiles(int seg_first, int seg_last, int gi, int& first, int& last) {
  const int per = (seg_last - seg_first + kGroups) / kGroups;
  first = seg_first + gi * per;
  last = min(seg_last, first + per - 1);
}

// Every thread's partial value v (its 4 states over its group's tiles) and sum of delta sd, folded over the groups in
// the order k = 0, 1, .. (kFromFirst) or 3, 2, ..: acc = exp(A sum_k delta) acc + v_k - the forward's E = E_3 + P_3
// (E_2 + P_2 (...)) from group 0, the backward's L = L_0 + P_0 (L_1 + ...) from group 3 - and stored by group 0 with
// the segment's decay product exp(A sum delta): out[0..3] and out[plane + 0..3]. Every thread of the block calls it
// (a block barrier); the cp.async copies must be complete.
template <bool kFromFirst>
__device__ __forceinline__ void fold_groups(int gi, int tid, const float (&v)[4], float sd, const float (&A2)[4],
                                            float* out, int64_t plane) {
  __shared__ float4 fold_v[kGroups][kGT];
  __shared__ float fold_sd[kGroups][kGT];
  fold_v[gi][tid] = make_float4(v[0], v[1], v[2], v[3]);
  fold_sd[gi][tid] = sd;
  __syncthreads();
  if (gi != 0) return;
  float acc[4] = {0.f, 0.f, 0.f, 0.f}, sum = 0.f;
#pragma unroll
  for (int i = 0; i < kGroups; ++i) {
    const int k = kFromFirst ? i : kGroups - 1 - i;
    const float4 v4 = fold_v[k][tid];
    const float vk[4] = {v4.x, v4.y, v4.z, v4.w}, sk = fold_sd[k][tid];
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j] = fmaf(ex2(A2[j] * sk), acc[j], vk[j]);
    sum += sk;
  }
  *reinterpret_cast<float4*>(out) = make_float4(acc[0], acc[1], acc[2], acc[3]);
  *reinterpret_cast<float4*>(out + plane) =
      make_float4(ex2(A2[0] * sum), ex2(A2[1] * sum), ex2(A2[2] * sum), ex2(A2[3] * sum));
}

}  // namespace prepass
}  // namespace apriel
