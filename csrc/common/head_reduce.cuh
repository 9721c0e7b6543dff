// Per-head sums of the dB / dC contributions in the scan backwards (csrc/scan: mixer_scan_bwd4.cuh;
// csrc/sscan: sscan_bwd2.cuh). CUDA headers only.
//
// Both backwards give a block one group of kCh channels that share one B / C row per token, so dB and dC of
// a token are sums over those channels. The adjoint leaves them in shared memory as padded rows
//   rB[t][ch * kN + s], rC[t][ch * kN + s]    (t < kRows, ch < kCh, s < kN; row length kRowStride >= kCh kN)
// and this helper sums each (token, quad of 4 states) over the channels in the fixed order 0 .. kCh-1:
// the order is what makes dB / dC bitwise deterministic run to run (no atomics), so keep it.
// Work item idx = (which, t, q) with which 0 = dB, 1 = dC, q = state quad; threads stride the items by NT so
// one 8-lane phase reads 2 tokens x 4 quads as float4 (the kernels pad kRowStride for that pattern).
#pragma once
#include <cuda_runtime.h>

namespace apriel {

// store(which, t, q, sum) receives the float4 sum of states 4q .. 4q+3 of token t (t < nt only) for dB
// (which == 0) or dC (which == 1); the caller decides where it goes (partials, or the activation dtype).
template <int kRows, int kN, int kCh, int kRowStride, int NT, typename Store>
__device__ __forceinline__ void head_reduce_bc(const float (*rB)[kRowStride], const float (*rC)[kRowStride],
                                               int nt, int tid, Store&& store) {
  static_assert(kN % 4 == 0 && kRowStride % 4 == 0 && kRowStride >= kCh * kN, "float4 rows of kCh x kN");
  constexpr int kQuads = kN / 4, kItems = kRows * kQuads;
  for (int idx = tid; idx < 2 * kItems; idx += NT) {
    const int which = idx / kItems, rem = idx % kItems, t = rem / kQuads, q = rem % kQuads;
    if (t >= nt) continue;
    const float* row = which == 0 ? &rB[t][4 * q] : &rC[t][4 * q];
    float4 sum = *reinterpret_cast<const float4*>(row);
#pragma unroll
    for (int ch = 1; ch < kCh; ++ch) {
      const float4 v = *reinterpret_cast<const float4*>(row + ch * kN);
      sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
    }
    store(which, t, q, sum);
  }
}

}  // namespace apriel
