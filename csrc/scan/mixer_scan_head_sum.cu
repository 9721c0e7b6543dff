// Backward epilogue of the mixer scan: the r head copies of each x / B group summed and written straight into
// dzxbc's x and B slices (activation dtype), in one pass over the fp32 partial buffers.
//
// Why: the backward kernels write d(conv input) and dB per HEAD (dx_part, dB_part: (b, L, D) fp32, deterministic:
// no atomics across the r heads that share a group). The host epilogue summed them with torch (a (b, L, X) fp32
// temporary each) and copied the result into the strided dzxbc slice: two extra passes over 2 x (b, L, X) fp32.
// Here one thread reads the r copies of 4 consecutive x channels of one token (16-byte loads) for dx and for dB,
// adds them in head order (fixed: deterministic) and stores 4 values into each slice.
//
// Shape contract: dx_part / dB_part (b, L, D) fp32 contiguous, channel c = (group g, head j < r, k < 16) at
// g * 16 r + 16 j + k; dzxbc (b, L, 2D + 2X) contiguous in T, x slice at column D, B slice at D + X.
#include "../common/cuda_check.h"
#include "scan_common.cuh"

#include <cstdint>

namespace apriel {
namespace {

template <typename T> struct Store4;
template <> struct Store4<float> {
  static __device__ __forceinline__ void run(float* dst, float4 v) { *reinterpret_cast<float4*>(dst) = v; }
};
template <typename T> struct Store4 {
  static __device__ __forceinline__ void run(T* dst, float4 v) {
    const T e[4] = {scan::from_f<T>(v.x), scan::from_f<T>(v.y), scan::from_f<T>(v.z), scan::from_f<T>(v.w)};
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(e);
  }
};

template <typename T>
__global__ void __launch_bounds__(256) mixer_scan_head_sum_kernel(const float* __restrict__ dx_part,
                                                                  const float* __restrict__ dB_part, T* dzxbc,
                                                                  int64_t rows, int D, int X, int r) {
  const int quads = X / 4;  // 4 x channels per thread
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * quads) return;
  const int64_t row = i / quads;
  const int xq = (int)(i % quads) * 4, g = xq / 16, k = xq % 16;
  const float* px = dx_part + row * D + (int64_t)g * 16 * r + k;
  const float* pb = dB_part + row * D + (int64_t)g * 16 * r + k;
  float4 sx = *reinterpret_cast<const float4*>(px), sb = *reinterpret_cast<const float4*>(pb);
  for (int j = 1; j < r; ++j) {
    const float4 ax = *reinterpret_cast<const float4*>(px + 16 * j), ab = *reinterpret_cast<const float4*>(pb + 16 * j);
    sx.x += ax.x; sx.y += ax.y; sx.z += ax.z; sx.w += ax.w;
    sb.x += ab.x; sb.y += ab.y; sb.z += ab.z; sb.w += ab.w;
  }
  T* out = dzxbc + row * (2 * (int64_t)D + 2 * X);
  Store4<T>::run(out + D + xq, sx);
  Store4<T>::run(out + D + X + xq, sb);
}

}  // namespace

template <typename T>
void launch_mixer_scan_head_sum(const float* dx_part, const float* dB_part, void* dzxbc, int64_t rows, int D, int X,
                                int r, void* stream) {
  const int64_t n = rows * (X / 4);
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  mixer_scan_head_sum_kernel<T><<<(unsigned)blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(
      dx_part, dB_part, static_cast<T*>(dzxbc), rows, D, X, r);
  APRIEL_CHECK_LAUNCH();
}

template void launch_mixer_scan_head_sum<float>(const float*, const float*, void*, int64_t, int, int, int, void*);
template void launch_mixer_scan_head_sum<__nv_bfloat16>(const float*, const float*, void*, int64_t, int, int, int, void*);
template void launch_mixer_scan_head_sum<__half>(const float*, const float*, void*, int64_t, int, int, int, void*);

}  // namespace apriel
