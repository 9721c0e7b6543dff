// Backward epilogue of the mixer scan: each x / B group's parts summed and written straight into dzxbc's x and B
// slices (activation dtype), in one pass over the fp32 part buffers.
//
// Why: the backward kernels that do not sum a whole group in one block write d(conv input) and dB in parts (dx_part,
// dB_part: (b, L, parts, 16) fp32, deterministic: no atomics across the heads that share a group): v4 one part per
// head (r per group), v7 one per (block, group) - the sums of the block's heads of that group (session 21; 1-3 parts
// per group instead of r). Here one thread reads a group's parts of 4 consecutive x channels of one token (16-byte
// loads) for dx and for dB, adds them in part order (fixed: deterministic), adds the final conv state's gradient
// (the last width-1 tokens) and a sequence split's halo (the next segment's contribution to a segment's last
// width-1 tokens) to dx, and stores 4 values into each slice.
//
// Shape contract: see HeadSumArgs (scan_params.h); dzxbc (b, L, 2D + 2X) contiguous in T, x slice at column D, B slice
// at D + X.
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
__global__ void __launch_bounds__(256) mixer_scan_head_sum_kernel(HeadSumArgs a) {
  const int quads = a.X / 4;  // 4 x channels per thread
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= a.batch * a.seqlen * quads) return;
  const int64_t row = i / quads;
  const int xq = (int)(i % quads) * 4, g = xq / 16, k = xq % 16;
  const int off = a.group_offset ? g : 0;
  const int first = g * a.r / a.heads_per_part + off, last = ((g + 1) * a.r - 1) / a.heads_per_part + off;
  const float* px = a.dx_part + (row * a.parts + first) * 16 + k;
  const float* pb = a.dB_part + (row * a.parts + first) * 16 + k;
  float4 sx = *reinterpret_cast<const float4*>(px), sb = *reinterpret_cast<const float4*>(pb);
  for (int j = 1; j <= last - first; ++j) {
    const float4 ax = *reinterpret_cast<const float4*>(px + 16 * j), ab = *reinterpret_cast<const float4*>(pb + 16 * j);
    sx.x += ax.x; sx.y += ax.y; sx.z += ax.z; sx.w += ax.w;
    sb.x += ab.x; sb.y += ab.y; sb.z += ab.z; sb.w += ab.w;
  }
  if (a.dfc_rows != nullptr || a.x_halo != nullptr) {  // (the 64-bit divisions only where rows get these terms)
    const int64_t bi = row / a.seqlen, t = row - bi * a.seqlen;
    auto add = [&](const float* src) {
      const float4 v = *reinterpret_cast<const float4*>(src);
      sx.x += v.x; sx.y += v.y; sx.z += v.z; sx.w += v.w;
    };
    if (a.dfc_rows != nullptr && t >= a.seqlen - a.hw)
      add(a.dfc_rows + (bi * a.hw + t - (a.seqlen - a.hw)) * a.X + xq);
    if (a.x_halo != nullptr) {
      const int64_t seg = t / a.seg_len, edge = t - ((seg + 1) * a.seg_len - a.hw);
      if (seg < a.segments - 1 && edge >= 0) add(a.x_halo + ((bi * (a.segments - 1) + seg) * a.hw + edge) * a.X + xq);
    }
  }
  T* out = static_cast<T*>(a.dzxbc) + row * (2 * (int64_t)a.D + 2 * a.X);
  Store4<T>::run(out + a.D + xq, sx);
  Store4<T>::run(out + a.D + a.X + xq, sb);
}

}  // namespace

template <typename T>
void launch_mixer_scan_head_sum(const HeadSumArgs& a, void* stream) {
  const int64_t n = a.batch * a.seqlen * (a.X / 4);
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  mixer_scan_head_sum_kernel<T><<<(unsigned)blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  APRIEL_CHECK_LAUNCH();
}

template void launch_mixer_scan_head_sum<float>(const HeadSumArgs&, void*);
template void launch_mixer_scan_head_sum<__nv_bfloat16>(const HeadSumArgs&, void*);
template void launch_mixer_scan_head_sum<__half>(const HeadSumArgs&, void*);

}  // namespace apriel
