// Backward epilogue of the mixer scan: the parameter gradients' partial rows summed and written in their dtypes, in
// one launch (session 22).
//
// Why: the backward kernels leave every whole-sequence gradient as fp32 partial rows - one per (sequence, segment) for
// A_log, D, the conv weight / bias and dt_proj's weight / bias, one per (token, block) for d(dt_low) (v7: each block's
// 64 channels) - and a sequence split's halo rows (the next segment's share of a segment's last width-1 x rows).
// Torch summed and converted them in ~18 small kernels (9 reductions, the dtype copies, an add, the strided halo copy):
// 0.065 ms of device time at b1 L8192, 0.10 ms at b8 L4096 (bench/results/s22/). Here one launch does all of it, in
// three jobs over consecutive block ranges of one grid (in block order: channels, halo, rows):
//   rows     (v7) d(dt_low)[row, k] = sum over the nblk partials of row: one warp per (b, L) row reads the row's
//            nblk x 16 floats with 16-byte coalesced loads (lane: rank quad lane % 4, partials lane / 4 + 8 m),
//            then a fixed shuffle tree over the 8 lanes of a quad;
//   channels one thread per channel c < D: dA_log[c, :], dD[c], d W_dt[c, :R], d b_dt[c] (x 2: the double bias),
//            and per conv channel (D, or X when the conv runs before the repeat: the group's r heads summed too)
//            the conv weight / bias gradients; partial rows summed in row order;
//   halo     (a split, fused group sums) dzxbc's x columns of each non-last segment's last width-1 tokens = the
//            kernel's dx_edge row + the next segment's dinit_conv rows summed over the group's r heads; (group parts)
//            the same halo sums into x_halo (fp32) for the head-sum kernel, which runs after this one.
// Every sum runs in a fixed order: deterministic.
//
// Shape contract: FinalizeArgs (scan_params.h).
#include "../common/cuda_check.h"
#include "scan_common.cuh"

#include <cstdint>

namespace apriel {
namespace {

constexpr int kThreadsPerBlock = 256;

// v converted to the output's dtype (a ParamDType) and stored at base[i].
__device__ __forceinline__ void store_as(void* base, int64_t i, int dtype, float v) {
  switch (dtype) {
    case kParamF32: static_cast<float*>(base)[i] = v; break;
    case kParamF64: static_cast<double*>(base)[i] = static_cast<double>(v); break;
    case kParamBF16: static_cast<__nv_bfloat16*>(base)[i] = scan::from_f<__nv_bfloat16>(v); break;
    default: static_cast<__half*>(base)[i] = scan::from_f<__half>(v); break;
  }
}

template <typename T>
__device__ void rows_job(const FinalizeArgs& a, int64_t block) {
  const int lane = threadIdx.x % 32, quad = lane % 4;
  const int64_t row = block * (kThreadsPerBlock / 32) + threadIdx.x / 32;
  if (row >= a.batch * a.seqlen) return;
  const float* __restrict__ src = a.ddt_low_part + row * a.nblk * 16 + 4 * quad;
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8  // (the loads of 8 partials in flight per lane: the job is bound by reading the partials)
  for (int blk = lane / 4; blk < a.nblk; blk += 8) {
    const float4 v = *reinterpret_cast<const float4*>(src + blk * 16);
    s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
  }
#pragma unroll
  for (int off = 4; off < 32; off *= 2) {  // the 8 lanes of a quad, fixed tree
    s.x += __shfl_xor_sync(0xffffffffu, s.x, off);
    s.y += __shfl_xor_sync(0xffffffffu, s.y, off);
    s.z += __shfl_xor_sync(0xffffffffu, s.z, off);
    s.w += __shfl_xor_sync(0xffffffffu, s.w, off);
  }
  if (lane < 4) {
    const float v[4] = {s.x, s.y, s.z, s.w};
    T* out = static_cast<T*>(a.ddt_low) + row * a.R;
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (4 * quad + e < a.R) out[4 * quad + e] = scan::from_f<T>(v[e]);
  }
}

__device__ void channels_job(const FinalizeArgs& a, int64_t block) {
  const int64_t i = block * kThreadsPerBlock + threadIdx.x;
  if (i < a.D) {
    const int c = static_cast<int>(i);
    float sA[16], sw[16], sD = 0.f, sb = 0.f;
#pragma unroll
    for (int n = 0; n < 16; ++n) sA[n] = sw[n] = 0.f;
    for (int s = 0; s < a.bs; ++s) {  // (an unroll here spills at 64 registers)
      const int64_t rc = (int64_t)s * a.D + c;
#pragma unroll
      for (int n4 = 0; n4 < 4; ++n4) {
        const float4 v = *reinterpret_cast<const float4*>(a.dA_part + rc * 16 + 4 * n4);
        sA[4 * n4] += v.x; sA[4 * n4 + 1] += v.y; sA[4 * n4 + 2] += v.z; sA[4 * n4 + 3] += v.w;
        if (a.dw_part != nullptr) {
          const float4 w = *reinterpret_cast<const float4*>(a.dw_part + rc * 16 + 4 * n4);
          sw[4 * n4] += w.x; sw[4 * n4 + 1] += w.y; sw[4 * n4 + 2] += w.z; sw[4 * n4 + 3] += w.w;
        }
      }
      sD += a.dD_part[rc];
      if (a.db_part != nullptr) sb += a.db_part[rc];
    }
#pragma unroll
    for (int n = 0; n < 16; ++n) store_as(a.dA, (int64_t)c * 16 + n, a.dA_dtype, sA[n]);
    store_as(a.dD, c, a.dD_dtype, sD);
    if (a.dw_part != nullptr) {
#pragma unroll
      for (int k = 0; k < 16; ++k)
        if (k < a.R) store_as(a.dw, (int64_t)c * a.R + k, a.dw_dtype, sw[k]);
      store_as(a.db, c, a.db_dtype, 2.f * sb);  // dt_pre = dt_low W^T + b, and softplus adds b again
    }
  }
  // conv channel oc: the D channel itself (repeat before the conv), else x channel oc = group g, index k summed over
  // the group's r heads (D channel (g r + j) 16 + k, j = 0 .. r-1) - partial rows outer, heads inner
  const int conv_channels = a.repeat ? a.D : a.X;
  if (i < conv_channels) {
    const int oc = static_cast<int>(i);
    const int heads = a.repeat ? 1 : a.r, c_first = a.repeat ? oc : ((oc / 16) * a.r) * 16 + oc % 16;
    float sw4[4] = {0.f, 0.f, 0.f, 0.f}, scb = 0.f;
#pragma unroll 4
    for (int s = 0; s < a.bs; ++s)
      for (int j = 0; j < heads; ++j) {
        const int64_t rc = (int64_t)s * a.D + c_first + 16 * j;
#pragma unroll
        for (int k = 0; k < 4; ++k)
          if (k < a.W) sw4[k] += a.dcw_part[rc * a.W + k];
        scb += a.dcb_part[rc];
      }
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (k < a.W) store_as(a.dcw, (int64_t)oc * a.W + k, a.dcw_dtype, sw4[k]);
    if (a.dcb != nullptr) store_as(a.dcb, oc, a.dcb_dtype, scb);
  }
}

template <typename T>
__device__ void halo_job(const FinalizeArgs& a, int64_t block) {
  const int64_t i = block * kThreadsPerBlock + threadIdx.x;  // (b, segment s < S-1, k < hw, x) row-major
  const int hw = a.W - 1;
  const int64_t n = (int64_t)a.batch * (a.segments - 1) * hw * a.X;
  if (i >= n) return;
  const int x = static_cast<int>(i % a.X);
  const int64_t rest = i / a.X;
  const int k = static_cast<int>(rest % hw);
  const int64_t bs_ = rest / hw, b = bs_ / (a.segments - 1), s = bs_ - b * (a.segments - 1);
  // the next segment's initial-conv-state gradient rows (its share of these tokens), summed over the group's heads
  const float* dic = a.dic_part + ((b * a.segments + s + 1) * a.D + (int64_t)(x / 16) * a.r * 16 + x % 16) * hw + k;
  float v = 0.f;
  for (int j = 0; j < a.r; ++j) v += dic[(int64_t)16 * j * hw];
  if (a.dx_edge != nullptr) {  // fused group sums: the kernel's edge row + the halo, straight into dzxbc
    v = a.dx_edge[((b * a.segments + s) * hw + k) * a.X + x] + v;
    const int64_t t = (s + 1) * a.seg_len - hw + k;
    static_cast<T*>(a.dzxbc)[(b * a.seqlen + t) * (2 * (int64_t)a.D + 2 * a.X) + a.D + x] = scan::from_f<T>(v);
  } else {  // group parts: (b, S-1, hw, X) for the head-sum kernel
    a.x_halo[i] = v;
  }
}

// Block order: the channel and halo jobs first - their threads run chains of dependent partial-row loads, which then
// overlap the rows job's bandwidth-bound tail instead of following it.
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock) mixer_scan_finalize_kernel(FinalizeArgs a, int64_t channel_blocks,
                                                                             int64_t halo_blocks) {
  const int64_t bid = blockIdx.x;
  if (bid < channel_blocks) channels_job(a, bid);
  else if (bid < channel_blocks + halo_blocks) halo_job<T>(a, bid - channel_blocks);
  else rows_job<T>(a, bid - channel_blocks - halo_blocks);
}

int64_t cdiv(int64_t n, int64_t d) { return (n + d - 1) / d; }

}  // namespace

template <typename T>
void launch_mixer_scan_finalize(const FinalizeArgs& a, void* stream) {
  const int64_t rows_blocks = a.ddt_low_part != nullptr ? cdiv(a.batch * a.seqlen, kThreadsPerBlock / 32) : 0;
  const int64_t channel_blocks = cdiv(a.D, kThreadsPerBlock);  // (D >= X: one thread per channel covers both)
  const int64_t halo_blocks =
      a.segments > 1 ? cdiv((int64_t)a.batch * (a.segments - 1) * (a.W - 1) * a.X, kThreadsPerBlock) : 0;
  const int64_t blocks = rows_blocks + channel_blocks + halo_blocks;
  if (blocks == 0) return;
  mixer_scan_finalize_kernel<T><<<(unsigned)blocks, kThreadsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      a, channel_blocks, halo_blocks);
  APRIEL_CHECK_LAUNCH();
}

template void launch_mixer_scan_finalize<float>(const FinalizeArgs&, void*);
template void launch_mixer_scan_finalize<__nv_bfloat16>(const FinalizeArgs&, void*);
template void launch_mixer_scan_finalize<__half>(const FinalizeArgs&, void*);

}  // namespace apriel
