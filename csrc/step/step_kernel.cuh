// Fused Apriel-H1 decode step: one launch per mixer layer advances q tokens of every sequence.
//
// Algorithm (mixer.md section 4): per sequence row and mixer channel c:
//   conv window (last W-1 pre-conv x of the x source channel, from the slot's conv cache) + new x
//   -> u = silu(conv + bias); delta = softplus(W_dt[c] . dt_low + 2 b_dt[c]) (the double bias, 3.4);
//   h[n] = exp(delta A[c,n]) h[n] + delta u B[g,n]; y = (sum_n C[c/N,n] h[n] + D[c] u) * silu(z[c]).
// The SSM state stays in fp32 registers across the q tokens; caches are written back once at the end.
//
// Thread mapping: 4 lanes per channel, each owning 4 of its 16 states (one 16-byte fp32 or 8-byte bf16
// state load/store per lane; a warp touches 8 channels = 512 contiguous state bytes). The 4 lanes split
// the dt_proj dot product and the C readout and combine them with two xor shuffles (every lane ends
// with the same bits). A block is one x/B group: N*r channels (r = D/X; 64 channels, 256 threads for
// Apriel-H1), so the r channels that share one x source channel - and therefore one compact conv-cache
// row - live in the same block: all window reads happen before a __syncthreads, the single writer of
// each row writes after it. blockIdx.y walks the batch, kSeq sequences per block so that the layer
// parameters (A_log, dt_proj, conv, D: ~140 B per channel) are read once per kSeq sequences.
//
// Bound: memory. The fp32 SSM cache is 64 B per channel read + written (512 KB per sequence at D=4096);
// everything else is < 10 % of the bytes. Grid = (X/N groups, ceil(batch/kSeq)), fixed for a batch
// size; no allocation, no host sync: CUDA-graph capturable.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.h"
#include "step_params.h"

namespace apriel {
namespace step {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Runtime-dtype element access for parameters and the conv cache (read once per block: the switch is
// uniform and off the hot path).
__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kFloat32: return static_cast<const float*>(p)[i];
    default: return static_cast<float>(static_cast<const double*>(p)[i]);
  }
}

__device__ __forceinline__ void store_any(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case kFloat32: static_cast<float*>(p)[i] = v; break;
    default: static_cast<double*>(p)[i] = static_cast<double>(v); break;
  }
}

// Bit copy of one element (the conv-window shift must not round an fp64 cache through fp32).
__device__ __forceinline__ void copy_any(void* p, int dtype, int64_t dst, int64_t src) {
  switch (dtype) {
    case kFloat16:
    case kBFloat16: static_cast<uint16_t*>(p)[dst] = static_cast<const uint16_t*>(p)[src]; break;
    case kFloat32: static_cast<uint32_t*>(p)[dst] = static_cast<const uint32_t*>(p)[src]; break;
    default: static_cast<uint64_t*>(p)[dst] = static_cast<const uint64_t*>(p)[src]; break;
  }
}

// Four consecutive states of one channel. Streaming cache hints: the cache is touched once per layer
// step, so it should not push the layer parameters out of L2.
template <typename state_t>
struct StateIO;

template <>
struct StateIO<float> {
  __device__ __forceinline__ static void load(const void* base, int64_t off, float h[4]) {
    const float4 v = __ldcs(reinterpret_cast<const float4*>(static_cast<const float*>(base) + off));
    h[0] = v.x; h[1] = v.y; h[2] = v.z; h[3] = v.w;
  }
  __device__ __forceinline__ static void store(void* base, int64_t off, const float h[4]) {
    __stcs(reinterpret_cast<float4*>(static_cast<float*>(base) + off), make_float4(h[0], h[1], h[2], h[3]));
  }
};

template <>
struct StateIO<__nv_bfloat16> {
  __device__ __forceinline__ static void load(const void* base, int64_t off, float h[4]) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(base) + off));
    const __nv_bfloat162 lo = *reinterpret_cast<const __nv_bfloat162*>(&v.x);
    const __nv_bfloat162 hi = *reinterpret_cast<const __nv_bfloat162*>(&v.y);
    const float2 a = __bfloat1622float2(lo), b = __bfloat1622float2(hi);
    h[0] = a.x; h[1] = a.y; h[2] = b.x; h[3] = b.y;
  }
  // fp32 math, rounded to nearest even on store.
  __device__ __forceinline__ static void store(void* base, int64_t off, const float h[4]) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(h[0], h[1]);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(h[2], h[3]);
    uint2 v;
    v.x = *reinterpret_cast<const uint32_t*>(&lo);
    v.y = *reinterpret_cast<const uint32_t*>(&hi);
    __stcs(reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(base) + off), v);
  }
};

__device__ __forceinline__ float silu_f(float v) { return v / (1.f + __expf(-v)); }

// Sum over the 4 lanes of a channel; xor butterflies give every lane identical bits.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

constexpr int kRegRanksPerLane = 4;  // ranks 0..15 live in registers (Apriel-H1: R = 16); more are re-read
constexpr int kMaxHalo = 3;  // W <= 4
constexpr int kMaxThreads = 256;  // one x/B group of N*r channels x 4 lanes: r <= 4

// Occupancy: the bytes in flight per SM are what bound this kernel, so registers are capped to keep
// >= 4 blocks (1024 threads) resident with one sequence per block, >= 3 with more state per thread.
template <typename act_t, typename state_t, int kSeq>
__global__ void __launch_bounds__(kMaxThreads, kSeq == 1 ? 4 : 3) mixer_step_kernel(const MixerStepParams p) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int tid = threadIdx.x;
  const int quarter = tid & 3;               // owns states 4*quarter .. 4*quarter+3
  const int ch_local = tid >> 2;             // channel inside the x/B group
  const int group_channels = blockDim.x >> 2;
  const int g = blockIdx.x;                  // x/B group (mixer.md section 2)
  const int c = g * group_channels + ch_local;
  const int n_in_head = ch_local & (kDState - 1);
  const int xs = g * kDState + n_in_head;    // x source channel = compact conv-cache row
  const int D = p.d_inner, X = p.d_xb;
  const bool compact_conv = p.conv_state_channels == X;

  int row[kSeq], slot[kSeq];
#pragma unroll
  for (int s = 0; s < kSeq; ++s) {
    row[s] = blockIdx.y * kSeq + s;
    slot[s] = row[s] < p.batch ? (p.slot_idx != nullptr ? p.slot_idx[row[s]] : row[s]) : -1;
    if (slot[s] >= p.num_slots) slot[s] = -1;
  }

  // 1. SSM state first: the dominant bytes, all sequences' loads in flight at once.
  float h[kSeq][4];
#pragma unroll
  for (int s = 0; s < kSeq; ++s) {
    if (slot[s] >= 0) {
      StateIO<state_t>::load(p.ssm_state, slot[s] * p.ssm_slot_stride + int64_t(c) * kDState + quarter * 4, h[s]);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) h[s][k] = 0.f;
    }
  }

  // 2. Layer parameters, once per block. A2 = -exp(A_log) log2(e) so the decay is one exp2.
  float A2[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    A2[k] = -expf(load_any(p.A_log, p.A_log_dtype, c * p.A_log_stride0 + (quarter * 4 + k) * p.A_log_stride1)) * kLog2e;
  }
  // This lane's dt ranks: quarter, quarter + 4, ... (the first kRegRanksPerLane kept in registers).
  float dtw[kRegRanksPerLane];
#pragma unroll
  for (int k = 0; k < kRegRanksPerLane; ++k) {
    const int rank = quarter + 4 * k;
    dtw[k] = rank < p.dt_rank ? load_any(p.dt_proj_weight, p.dt_proj_weight_dtype,
                                         c * p.dt_proj_weight_stride0 + rank * p.dt_proj_weight_stride1)
                              : 0.f;
  }
  const float dt_bias = load_any(p.dt_proj_bias, p.dt_proj_bias_dtype, c * p.dt_proj_bias_stride);
  const float d_skip = load_any(p.D_skip, p.D_skip_dtype, c * p.D_skip_stride);
  const int conv_ch = p.repeat_kv_before_conv ? c : xs;
  // Taps right-aligned in a 4-wide window so the loop is fixed-size: w4[4 - W + k] = w[k].
  float w4[kMaxHalo + 1];
#pragma unroll
  for (int k = 0; k <= kMaxHalo; ++k) {
    const int tap = k - (kMaxHalo + 1 - p.width);
    w4[k] = tap >= 0 ? load_any(p.conv_weight, p.conv_weight_dtype, conv_ch * p.conv_weight_stride0 + tap * p.conv_weight_stride1) : 0.f;
  }
  const float conv_b = p.conv_bias != nullptr ? load_any(p.conv_bias, p.conv_bias_dtype, conv_ch * p.conv_bias_stride) : 0.f;

  // 3. Conv windows: the last W-1 cached inputs of the x source channel. The D-channel layout is read
  //    at the first copy of the repeat (exactly what the reference does). Every read of the block
  //    happens before the barrier; the rows are rewritten after it.
  const int win_row = compact_conv ? xs : g * group_channels + n_in_head;
  float win[kSeq][kMaxHalo];
#pragma unroll
  for (int s = 0; s < kSeq; ++s) {
    const int64_t base = slot[s] * p.conv_slot_stride + win_row * p.conv_channel_stride;
#pragma unroll
    for (int k = 0; k < kMaxHalo; ++k) {
      const int pos = p.conv_state_len - kMaxHalo + k;
      win[s][k] = (slot[s] >= 0 && k >= kMaxHalo - (p.width - 1))
                      ? load_any(p.conv_state, p.conv_state_dtype, base + pos * p.conv_pos_stride)
                      : 0.f;
    }
  }
  __syncthreads();

  const act_t* zxbc = static_cast<const act_t*>(p.zxbc);
  const act_t* dt_low = static_cast<const act_t*>(p.dt_low);
  act_t* y = static_cast<act_t*>(p.y);
  const int b_off = D + X + g * kDState + quarter * 4;          // B[g, 4*quarter ..]
  const int c_off = D + 2 * X + (c / kDState) * kDState + quarter * 4;  // C[c/N, 4*quarter ..]

  // 4. The q tokens of each sequence, state in registers.
#pragma unroll
  for (int s = 0; s < kSeq; ++s) {
    if (row[s] >= p.batch) continue;
    act_t* y_row = y + row[s] * p.y_batch_stride + c;
    if (slot[s] < 0) {  // padding row: y = 0, no state I/O
      if (quarter == 0) {
        for (int t = 0; t < p.q; ++t) y_row[t * p.y_token_stride] = from_f<act_t>(0.f);
      }
      continue;
    }
    for (int t = 0; t < p.q; ++t) {
      const act_t* zr = zxbc + row[s] * p.zxbc_batch_stride + t * p.zxbc_token_stride;
      const act_t* dr = dt_low + row[s] * p.dt_batch_stride + t * p.dt_token_stride;
      float dt = 0.f;
#pragma unroll
      for (int k = 0; k < kRegRanksPerLane; ++k) {
        if (quarter + 4 * k < p.dt_rank) dt += dtw[k] * to_f(dr[quarter + 4 * k]);
      }
      for (int rank = 4 * kRegRanksPerLane + quarter; rank < p.dt_rank; rank += 4) {  // R > 16 only
        dt += load_any(p.dt_proj_weight, p.dt_proj_weight_dtype,
                       c * p.dt_proj_weight_stride0 + rank * p.dt_proj_weight_stride1) * to_f(dr[rank]);
      }
      dt = quad_sum(dt);
      // dt_proj's own bias, then the scan's delta_bias (the same vector again): mixer.md 3.4.
      const float v = (dt + dt_bias) + dt_bias;
      const float delta = v > 20.f ? v : log1pf(expf(v));
      const float x_new = to_f(zr[D + xs]);
      const float pre = conv_b + w4[0] * win[s][0] + w4[1] * win[s][1] + w4[2] * win[s][2] + w4[3] * x_new;
      win[s][0] = win[s][1];
      win[s][1] = win[s][2];
      win[s][2] = x_new;
      const float u = silu_f(pre);
      const float du = delta * u;
      float yp = 0.f;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float bk = to_f(zr[b_off + k]);
        const float ck = to_f(zr[c_off + k]);
        h[s][k] = exp2f(delta * A2[k]) * h[s][k] + du * bk;
        yp += ck * h[s][k];
      }
      yp = quad_sum(yp);
      const float yv = (yp + d_skip * u) * silu_f(to_f(zr[c]));
      if (quarter == 0) y_row[t * p.y_token_stride] = from_f<act_t>(yv);
    }
  }

  // 5. Write the caches back: SSM state (rounded on store for bf16), then the conv window shifted by q.
#pragma unroll
  for (int s = 0; s < kSeq; ++s) {
    if (slot[s] < 0) continue;
    StateIO<state_t>::store(p.ssm_state, slot[s] * p.ssm_slot_stride + int64_t(c) * kDState + quarter * 4, h[s]);
    // One writer per cache row: compact rows by the first repeat of their x channel, D-layout rows by
    // their own channel (each shifts its own old entries, like the reference).
    const bool writer = quarter == 0 && (!compact_conv || ch_local < kDState);
    if (!writer) continue;
    const int wrow = compact_conv ? xs : c;
    const int64_t base = slot[s] * p.conv_slot_stride + wrow * p.conv_channel_stride;
    const int S = p.conv_state_len;
    // Ascending positions: entry sp reads sp + q >= sp before anything at or above it is written.
    for (int sp = 0; sp < S; ++sp) {
      const int src = sp + p.q;
      if (src < S) {
        copy_any(p.conv_state, p.conv_state_dtype, base + sp * p.conv_pos_stride, base + src * p.conv_pos_stride);
      } else {
        const act_t* zr = zxbc + row[s] * p.zxbc_batch_stride + (src - S) * p.zxbc_token_stride;
        store_any(p.conv_state, p.conv_state_dtype, base + sp * p.conv_pos_stride, to_f(zr[D + xs]));
      }
    }
  }
}

template <typename act_t, typename state_t>
void launch_with_state(const MixerStepParams& p, cudaStream_t stream) {
  const int r = p.d_inner / p.d_xb;
  const dim3 block(4 * kDState * r);
  const int spb = p.seq_per_block;
  const dim3 grid(p.d_xb / kDState, (p.batch + spb - 1) / spb);
  // 3 sequences-per-block variants x 2 state dtypes per activation dtype: 6 instantiations per .cu file.
  switch (spb) {
    case 4: mixer_step_kernel<act_t, state_t, 4><<<grid, block, 0, stream>>>(p); break;
    case 2: mixer_step_kernel<act_t, state_t, 2><<<grid, block, 0, stream>>>(p); break;
    default: mixer_step_kernel<act_t, state_t, 1><<<grid, block, 0, stream>>>(p); break;
  }
  APRIEL_CHECK_LAUNCH();
}

template <typename act_t>
void launch_mixer_step(const MixerStepParams& p, bool ssm_state_bf16, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (ssm_state_bf16) {
    launch_with_state<act_t, __nv_bfloat16>(p, s);
  } else {
    launch_with_state<act_t, float>(p, s);
  }
}

}  // namespace step
}  // namespace apriel
