// Device helpers of the generic selective scan: dtype conversion, ex2, tile staging, the K-lane reduce-scatter.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/cuda_check.h"
#include "../common/scan_math.cuh"
#include "sscan_params.h"

namespace apriel {
namespace sscan {

constexpr int kT = kSsTile, kRow = kSsRow, kThreads = kSsChannels * kSsLanes;
using ::apriel::ex2;  // ../common/scan_math.cuh: conversions, MUFU forms, the K-lane reduce-scatter
using ::apriel::from_f;
using ::apriel::kLog2e;
using ::apriel::reduce_scatter;
using ::apriel::sigmoid_fast;
using ::apriel::to_f;

// The v1 kernels' sigmoid (kept: APRIEL_SSCAN_SOFTPLUS=precise reproduces v1 bitwise).
__device__ __forceinline__ float sigmoidf_(float v) { return 1.f / (1.f + __expf(-v)); }

// softplus with the peers' threshold (v > 20: v); log1p(e) by its series below 1e-2 (where 1 + e would round
// away the digits delta is made of), by lg2(1 + e) ln 2 above. fast = false: the precise log1pf(expf(v)).
__device__ __forceinline__ float softplus_v2(float v, bool fast) {
  if (!fast) return v > 20.f ? v : log1pf(expf(v));
  return softplus_fast(v);
}

// Stage a (kT tokens x 16 channels) tile, dst[t * kRow + ci] (fp32), from base (batch offset applied) at
// element (t0 + t) * sl + off(ci); zero for t >= nt or off(ci) < 0 (channel past D). Consecutive threads
// walk the unit-stride dimension (tokens for a channel-major tensor, channels otherwise): coalesced reads.
template <typename T, typename Off>
__device__ __forceinline__ void stage_channels(float* dst, const T* base, int64_t sl, bool token_fast, int t0, int nt,
                                               int tid, Off off) {
#pragma unroll
  for (int idx = tid; idx < kT * kSsChannels; idx += kThreads) {
    const int t = token_fast ? idx % kT : idx / kSsChannels;
    const int ci = token_fast ? idx / kT : idx % kSsChannels;
    const int64_t o = off(ci);
    float v = 0.f;
    if (t < nt && o >= 0) v = to_f(base[(int64_t)(t0 + t) * sl + o]);
    dst[t * kRow + ci] = v;
  }
}

// Stage a (kT tokens x ngl groups x NP states) B or C tile, dst[t * row + (lg * NP + n) * es], from
// base[(t0 + t) * sl + (g0 + lg) * sg + n * sn]; zero past the sequence, past the last group, for n >= N.
// es = 2 interleaves B and C (float2 (B, C) per state: one 64-bit shared load per element).
template <typename T>
__device__ __forceinline__ void stage_groups(float* dst, int row, const T* base, int64_t sl, int64_t sg, int64_t sn,
                                             int t0, int nt, int g0, int ngl, int groups, int N, int NP, int tid,
                                             int es = 1) {
  const int width = ngl * NP;
  const bool token_fast = sl == 1 && sn != 1;
  const int total = kT * width;
  for (int idx = tid; idx < total; idx += kThreads) {
    int t, j;
    if (token_fast) { t = idx % kT; j = idx / kT; } else { j = idx % width; t = idx / width; }
    const int lg = j / NP, n = j - lg * NP, g = g0 + lg;
    float v = 0.f;
    if (t < nt && n < N && g < groups) v = to_f(base[(int64_t)(t0 + t) * sl + (int64_t)g * sg + (int64_t)n * sn]);
    dst[t * row + j * es] = v;
  }
}

// keep[t] = 0 where token t0 + t starts a new document (t0 + t > 0), else 1 (pads: 1).
__device__ __forceinline__ void stage_keep(float* s_keep, const int* seq, int t0, int nt, int tid) {
  if (tid < kT) {
    float k = 1.f;
    if (seq != nullptr && tid < nt && t0 + tid > 0) k = seq[t0 + tid] == seq[t0 + tid - 1] ? 1.f : 0.f;
    s_keep[tid] = k;
  }
}

// Sum acc over the 16 lanes of a channel (lanes = 16 consecutive, 16-aligned lanes of a warp) and scatter
// the totals: afterwards acc[i], i < kT / 16, holds the total of token (kT / 16) * lane + i. Costs kT - 2
// shuffles per lane per tile (vs 4 per token for a butterfly per token). Fixed order: deterministic.
template <int kOff, int kHalf>
__device__ __forceinline__ void reduce_scatter_step(float (&acc)[kT], int lane) {
  const bool upper = (lane & kOff) != 0;
#pragma unroll
  for (int j = 0; j < kHalf; ++j) {
    const float send = upper ? acc[j] : acc[j + kHalf];
    const float mine = upper ? acc[j + kHalf] : acc[j];
    acc[j] = mine + __shfl_xor_sync(0xffffffffu, send, kOff);
  }
}
__device__ __forceinline__ void reduce_scatter(float (&acc)[kT], int lane) {
  static_assert(kT == 32 && kSsLanes == 16, "reduce_scatter is written for 32 tokens over 16 lanes");
  reduce_scatter_step<8, 16>(acc, lane);
  reduce_scatter_step<4, 8>(acc, lane);
  reduce_scatter_step<2, 4>(acc, lane);
  reduce_scatter_step<1, 2>(acc, lane);
}

// Sum v over the 16 lanes of a channel (every lane gets the total; fixed order).
__device__ __forceinline__ float lane_sum(float v) {
#pragma unroll
  for (int o = 8; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Shared per-block geometry: channel, groups, the u source channel.
struct Geo {
  int lane, ci, tid, blk, b, c0, c;
  bool cvalid;
  int gb0, gc0, lgb, lgc;  // first B / C group of the block, this channel's group relative to it

  __device__ __forceinline__ explicit Geo(const SScanParams& p) {
    lane = threadIdx.x; ci = threadIdx.y; tid = ci * kSsLanes + lane;
    blk = blockIdx.x; b = blockIdx.y;
    c0 = blk * kSsChannels; c = c0 + ci;
    cvalid = c < p.dim;
    const int cc = cvalid ? c : p.dim - 1;
    gb0 = c0 / p.b_cpg; gc0 = c0 / p.c_cpg;
    lgb = cc / p.b_cpg - gb0; lgc = cc / p.c_cpg - gc0;
  }
};

// Element offset of channel c0 + ci's u column (the mixer's 16-wide group repeat when u_rep > 1), -1 past D.
__device__ __forceinline__ int64_t u_col(const SScanParams& p, int c) {
  if (c >= p.dim) return -1;
  const int src = p.u_rep == 1 ? c : (c / (p.dstate * p.u_rep)) * p.dstate + c % p.dstate;
  return (int64_t)src * p.u_sc;
}

}  // namespace sscan
}  // namespace apriel
