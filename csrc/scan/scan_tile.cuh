// Register-level helpers of the scan kernels: vector loads/stores of a thread's states and the
// reduce-scatter of per-token partial sums over the K lanes of a channel.
#pragma once
#include "scan_common.cuh"

namespace apriel {
namespace scan {

// Loads NS consecutive floats of a 16-float smem row (NS = 16 / K: 2, 4 or 8) with vector loads.
template <int NS>
__device__ __forceinline__ void load_states(const float* row, float (&v)[NS]) {
  if constexpr (NS == 1) {
    v[0] = row[0];
  } else if constexpr (NS == 2) {
    const float2 a = *reinterpret_cast<const float2*>(row);
    v[0] = a.x; v[1] = a.y;
  } else {
#pragma unroll
    for (int i = 0; i < NS; i += 4) {
      const float4 a = *reinterpret_cast<const float4*>(row + i);
      v[i] = a.x; v[i + 1] = a.y; v[i + 2] = a.z; v[i + 3] = a.w;
    }
  }
}

// EXPERIMENT (session 31): checkpoint stores as st.global.cs (evict-first: rows this kernel never reads again) -
// 0 plain, 1 the sub-chunk rows, 2 every checkpoint row.
#ifndef APRIEL_SCAN_CKPT_STORE_CS
#define APRIEL_SCAN_CKPT_STORE_CS 0
#endif
template <int NS, bool kStream = false>
__device__ __forceinline__ void store_states(float* row, const float (&v)[NS]) {
  if constexpr (NS == 1) {
    if constexpr (kStream) __stcs(row, v[0]); else row[0] = v[0];
  } else if constexpr (NS == 2) {
    if constexpr (kStream) __stcs(reinterpret_cast<float2*>(row), make_float2(v[0], v[1]));
    else *reinterpret_cast<float2*>(row) = make_float2(v[0], v[1]);
  } else {
#pragma unroll
    for (int i = 0; i < NS; i += 4) {
      if constexpr (kStream) __stcs(reinterpret_cast<float4*>(row + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
      else *reinterpret_cast<float4*>(row + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    }
  }
}

using ::apriel::reduce_scatter;  // ../common/scan_math.cuh

}  // namespace scan
}  // namespace apriel
