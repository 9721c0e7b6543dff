// Shared device code of the mixer scan kernels: constants, the time-tile loader and the per-(channel, token)
// "prep" math (conv + silu, dt_proj + double bias + softplus); dtype conversion and the MUFU forms come from
// ../common/scan_math.cuh.
//
// Block = one head (16 channels) of one sequence. A head's channels read the 16 x channels and the 16-wide
// B slice of their x/B group (repeat by index math) and their own 16-wide C slice. A time tile of kChunk
// tokens is staged in shared memory as fp32; x carries a 3-token halo for the causal conv.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/scan_math.cuh"
#include "scan_params.h"

namespace apriel {
namespace scan {

constexpr int kN = 16;      // d_state (the kernels are written for the Apriel-H1 value)
constexpr int kChunk = 32;  // tokens per tile = checkpoint interval
constexpr int kHalo = 3;    // conv halo rows (width <= 4)
constexpr int kMaxR = 32;   // dt_rank limit of the smem staging and register prefetch
using ::apriel::ex2;
using ::apriel::from_f;
using ::apriel::kLog2e;
using ::apriel::sigmoid_fast;
using ::apriel::softplus_fast;
using ::apriel::to_f;

// A layer parameter in its own dtype (fp32 / bf16 / fp16: ParamDType): read once per block, so the branch is free.
__device__ __forceinline__ float ld_param(const ParamRef& r, int64_t i) {
  if (r.dtype == kParamBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(r.ptr)[i]);
  if (r.dtype == kParamF16) return __half2float(static_cast<const __half*>(r.ptr)[i]);
  return static_cast<const float*>(r.ptr)[i];
}

// The staged tile (fp32). Rows of x / seq: position t0 - kHalo + i.
struct Tile {
  alignas(16) float x[kChunk + kHalo][kN];
  alignas(16) float B[kChunk][kN];
  alignas(16) float C[kChunk][kN];
  alignas(16) float z[kChunk][kN];
  alignas(16) float dy[kChunk][kN];        // backward only
  alignas(16) float dt[kChunk][kMaxR + 4]; // +4: rows stay 16-byte aligned and a warp's two rows use different banks
  alignas(16) int seq[kChunk + kHalo];
};

// Global -> registers -> smem staging, so the loads of tile i+1 are in flight while tile i computes.
template <typename T, int NT, bool kWithDy>
struct TileRegs {
  static constexpr int kXN = (kN * (kChunk + kHalo) + NT - 1) / NT;
  static constexpr int kBCZ = 3 * kN * kChunk / NT;
  static constexpr int kDT = kMaxR * kChunk / NT;
  static constexpr int kDY = kWithDy ? kN * kChunk / NT : 1;
  T x[kXN], bcz[kBCZ], dt[kDT], dy[kDY];
  int seq;

  __device__ __forceinline__ void load(const MixerScanParams& p, int b, int head, int group, int t0) {
    const int tid = threadIdx.x;
    const T* zx = reinterpret_cast<const T*>(p.zxbc) + (int64_t)b * p.zxbc_batch_stride;
    const T zero = from_f<T>(0.f);
#pragma unroll
    for (int i = 0; i < kXN; ++i) {
      const int idx = tid + i * NT;
      const int pos = t0 - kHalo + idx / kN;
      x[i] = (idx < kN * (kChunk + kHalo) && pos >= 0 && pos < p.seqlen)
                 ? zx[pos * p.zxbc_row_stride + p.d_inner + group * kN + idx % kN] : zero;
    }
#pragma unroll
    for (int i = 0; i < kBCZ; ++i) {
      const int idx = tid + i * NT;
      const int which = idx / (kN * kChunk);
      const int rem = idx % (kN * kChunk);
      const int pos = t0 + rem / kN;
      // B (group slice), C (head slice), z (head slice) of the in_proj output row.
      const int col = which == 0 ? p.d_inner + p.d_xb + group * kN
                    : which == 1 ? p.d_inner + 2 * p.d_xb + head * kN
                    : head * kN;
      bcz[i] = pos < p.seqlen ? zx[pos * p.zxbc_row_stride + col + rem % kN] : zero;
    }
    // dt_low rows are staged kMaxR wide (compile-time shifts instead of divisions by R; columns >= R idle)
    const T* dtl = reinterpret_cast<const T*>(p.dt_low) + (int64_t)b * p.dt_batch_stride;
    const int R = p.dt_rank;
#pragma unroll
    for (int i = 0; i < kDT; ++i) {
      const int idx = tid + i * NT;
      const int pos = t0 + idx / kMaxR, col = idx % kMaxR;
      dt[i] = (col < R && pos < p.seqlen) ? dtl[pos * p.dt_row_stride + col] : zero;
    }
    if (kWithDy) {
      const T* dyp = reinterpret_cast<const T*>(p.dy) + (int64_t)b * p.seqlen * p.d_inner;
#pragma unroll
      for (int i = 0; i < kDY; ++i) {
        const int idx = tid + i * NT;
        const int pos = t0 + idx / kN;
        dy[i] = pos < p.seqlen ? dyp[(int64_t)pos * p.d_inner + head * kN + idx % kN] : zero;
      }
    }
    seq = 0;
    if (tid < kChunk + kHalo && p.seq_idx != nullptr) {
      int pos = t0 - kHalo + tid;
      pos = pos < 0 ? 0 : (pos >= p.seqlen ? p.seqlen - 1 : pos);
      seq = p.seq_idx[(int64_t)b * p.seqlen + pos];
    }
  }

  // Writes the registers into the tile. For the first tile the halo comes from the initial conv state.
  __device__ __forceinline__ void store(const MixerScanParams& p, Tile& S, int b, int group, int t0) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < kXN; ++i) {
      const int idx = tid + i * NT;
      if (idx < kN * (kChunk + kHalo)) {
        float v = to_f(x[i]);
        const int pos = t0 - kHalo + idx / kN;
        if (pos < 0) {
          const int k = (p.width - 1) + pos;  // index into the last width-1 entries of the conv state
          v = (p.init_conv != nullptr && k >= 0)
                  ? p.init_conv[((int64_t)b * p.d_xb + group * kN + idx % kN) * (p.width - 1) + k] : 0.f;
        }
        S.x[idx / kN][idx % kN] = v;
      }
    }
#pragma unroll
    for (int i = 0; i < kBCZ; ++i) {
      const int idx = tid + i * NT;
      const int which = idx / (kN * kChunk);
      const int rem = idx % (kN * kChunk);
      float* dst = which == 0 ? &S.B[0][0] : which == 1 ? &S.C[0][0] : &S.z[0][0];
      dst[rem] = to_f(bcz[i]);
    }
#pragma unroll
    for (int i = 0; i < kDT; ++i) {
      const int idx = tid + i * NT;
      S.dt[idx / kMaxR][idx % kMaxR] = to_f(dt[i]);  // zero beyond R: the dot product may run to kMaxR
    }
    if (kWithDy) {
#pragma unroll
      for (int i = 0; i < kDY; ++i) {
        const int idx = tid + i * NT;
        S.dy[idx / kN][idx % kN] = to_f(dy[i]);
      }
    }
    if (tid < kChunk + kHalo) S.seq[tid] = seq;
  }
};

// Per-channel constants of the prep phase (a prep thread owns one channel of the head).
struct PrepConsts {
  float w[4];
  float cb, dtb;
  int wch;  // conv weight channel
};

__device__ __forceinline__ PrepConsts prep_consts(const MixerScanParams& p, int c, int group, int ch) {
  PrepConsts k;
  k.wch = p.repeat_before_conv ? c : group * kN + ch;
  // Right-align the taps so that tap 3 multiplies the current token for every width.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int src = i - (4 - p.width);
    k.w[i] = src >= 0 ? p.conv_w[k.wch * p.width + src] : 0.f;
  }
  k.cb = p.conv_b != nullptr ? p.conv_b[k.wch] : 0.f;
  k.dtb = p.dt_b[c];
  return k;
}

// Conv pre-activation of channel ch at tile row t (taps into earlier documents read zero).
__device__ __forceinline__ float conv_pre(const Tile& S, const PrepConsts& k, int ch, int t) {
  float acc = k.cb;
  const int cur = S.seq[t + kHalo];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = t + i;  // position t - 3 + i
    const float v = S.seq[row] == cur ? S.x[row][ch] : 0.f;
    acc = fmaf(k.w[i], v, acc);
  }
  return acc;
}

// dt_proj (R-wide dot, the Linear's bias) plus the bias again (delta_bias): the softplus input.
__device__ __forceinline__ float dt_pre2(const Tile& S, const float (*dtw)[kMaxR + 4], const PrepConsts& k,
                                         int ch, int t, int R) {
  // Unrolled over kMaxR in float4 steps; the staged rows of dt_low and W_dt are zero beyond R.
  float acc = 2.f * k.dtb;
#pragma unroll
  for (int i = 0; i < kMaxR; i += 4) {
    if (i < R) {
      const float4 w = *reinterpret_cast<const float4*>(&dtw[ch][i]);
      const float4 v = *reinterpret_cast<const float4*>(&S.dt[t][i]);
      acc = fmaf(w.x, v.x, fmaf(w.y, v.y, fmaf(w.z, v.z, fmaf(w.w, v.w, acc))));
    }
  }
  return acc;
}

// Packed documents (kSeq of the v7 forward and backward and of the TMA v5 K = 8 forward): the document starts around
// the tile at t0 as a bit mask per warp: bit i = a document starts at row i (i = 1 .. 37), row i = token t0 - 3 + i
// (rows 0..2: the conv halo; 3..34: the tile; 35..37: the next tile's first 3 tokens, which the backward's transposed
// conv reads). Ids are clamped to tokens 0 .. L - 1: before 0 = the document of token 0 (the initial conv / SSM states
// belong to it), past the end = the last id (those tokens are inert). load_doc_ids: this lane's ids of rows lane and
// 32 + lane, plain loads (L2-resident) that the kernels issue well before the mask is built (session 13 A/B: staging
// the ids per tile by 4-byte cp.async next to the TMA tile cost the backward 6 %); doc_starts: 3 shuffles, 2 ballots.
constexpr int kDocRows = kChunk + 6;
__device__ __forceinline__ int2 load_doc_ids(const MixerScanParams& p, int b, int t0, int lane) {
  const int* sq = p.seq_idx + (int64_t)b * p.seqlen;
  const int last = p.seqlen - 1;
  return make_int2(sq[min(max(t0 - 3 + lane, 0), last)], sq[min(max(t0 + 29 + lane, 0), last)]);
}
__device__ __forceinline__ uint64_t doc_starts(int2 ids, int lane) {
  static_assert(kDocRows <= 64, "two ballots");
  const int up_lo = __shfl_up_sync(0xffffffffu, ids.x, 1), last_lo = __shfl_sync(0xffffffffu, ids.x, 31);
  const int up_hi = __shfl_up_sync(0xffffffffu, ids.y, 1);
  const unsigned lo = __ballot_sync(0xffffffffu, lane >= 1 && ids.x != up_lo);
  const unsigned hi = __ballot_sync(0xffffffffu, lane + 32 < kDocRows && ids.y != (lane == 0 ? last_lo : up_hi));
  return (uint64_t)hi << 32 | lo;
}
// No document start in rows first .. first + n - 1 (n <= 3; first + n <= 38).
__device__ __forceinline__ bool no_start(uint64_t starts, int first, int n) {
  return ((unsigned)(starts >> first) & ((1u << n) - 1u)) == 0;
}

// The conv taps of tile token t (row t + 3) inside its document: tap[k] = token t - 3 + k counts (no start in rows
// t + k + 1 .. t + 3; tap[3], the token itself, always); keep = no start at t's own row (else the decay restarts).
// The same from the start bits of rows t + 1 .. t + 3 in bits 0..2 of tb (higher bits ignored).
__device__ __forceinline__ void doc_taps(unsigned tb, bool (&tap)[4], bool& keep) {
  tap[0] = (tb & 7u) == 0;
  tap[1] = (tb & 6u) == 0;
  tap[2] = (tb & 4u) == 0;
  keep = tap[2];
}
__device__ __forceinline__ void doc_taps(uint64_t starts, int t, bool (&tap)[4], bool& keep) {
  doc_taps((unsigned)(starts >> (t + 1)), tap, keep);  // starts at rows t + 1 .. t + 3
}

#ifdef APRIEL_SCAN_BLOCK_TIMES
// Diagnostic build only (scripts/diag/scan_block_times.py): a block's progress in global-timer nanoseconds, written
// by its thread 0 as raw 64-bit words over output rows it has already stored (the output is garbage there in such a
// build): words 0..3 (at `lo`) at its tiles 2, n/4, n/2 and 3n/4 in processing order, words 4..7 (at `hi`) = its end,
// (SM id << 32) | the hardware warp slot of its warp 0, (0x5A5A5A5A << 32) | tag, unused. Stores only: printf and a
// stamp array cost the v7 forward 60 % at 4 blocks per SM.
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
template <typename T>
__device__ __forceinline__ void block_time_mark(T* lo, int k, int n) {
  const int nq = n / 4;
  const int word = k == 2 ? 0 : (nq > 2 && k % nq == 0 && k / nq <= 3) ? k / nq : -1;
  if (word >= 0) reinterpret_cast<unsigned long long*>(lo)[word] = global_ns();
}
template <typename T>
__device__ __forceinline__ void block_time_end(T* hi, unsigned tag) {
  unsigned sm, slot;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  asm volatile("mov.u32 %0, %%warpid;" : "=r"(slot));
  auto* words = reinterpret_cast<unsigned long long*>(hi);
  words[0] = global_ns();
  words[1] = ((unsigned long long)sm << 32) | slot;
  words[2] = (0x5A5A5A5Aull << 32) | tag;
}
#endif
}  // namespace scan
}  // namespace apriel
