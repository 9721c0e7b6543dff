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

template <int NS>
__device__ __forceinline__ void store_states(float* row, const float (&v)[NS]) {
  if constexpr (NS == 1) {
    row[0] = v[0];
  } else if constexpr (NS == 2) {
    *reinterpret_cast<float2*>(row) = make_float2(v[0], v[1]);
  } else {
#pragma unroll
    for (int i = 0; i < NS; i += 4) *reinterpret_cast<float4*>(row + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
  }
}

using ::apriel::reduce_scatter;  // ../common/scan_math.cuh

}  // namespace scan
}  // namespace apriel
