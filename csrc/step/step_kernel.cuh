// Fused Apriel-H1 decode step: one launch per mixer layer advances q tokens of every sequence.
//
// Algorithm (mixer.md section 4): per sequence row and mixer channel c:
//   conv window (last W-1 pre-conv x of the x source channel, from the slot's conv cache) + new x
//   -> u = silu(conv + bias); delta = softplus(W_dt[c] . dt_low + 2 b_dt[c]) (the double bias, 3.4);
//   h[n] = exp(delta A[c,n]) h[n] + delta u B[g,n]; y = (sum_n C[c/N,n] h[n] + D[c] u) * silu(z[c]).
// The SSM state stays in fp32 registers across the q tokens; caches are written back once at the end.
//
// Thread mapping: one thread per (channel, sequence) owning all 16 states (four 16-byte fp32 or two
// 16-byte bf16 state loads; a warp covers 32 consecutive channels = 2 KB of contiguous state, every
// sector fully used). Per-channel scalar work (dt dot product, softplus, conv, gates) is done once per
// channel, not once per state lane: the first version split a channel over 4 lanes and was issue-bound
// (~4x the instructions per byte). A block = one x/B group of 16*r channels (r = D/X; 64 for Apriel-H1)
// x 256/(16 r) sequence lanes, so the r channels sharing one x source channel - hence one compact
// conv-cache row - are in the same block: window reads happen first, a single __syncthreads, then the
// single writer of each row rewrites it. Each thread handles kSeq sequences of its lane in turn, with
// the layer parameters staged once per block (A and dt_proj in shared memory, conv taps in registers).
//
// Bound: memory. The fp32 SSM cache is 64 B per channel read + written (512 KB per sequence at D=4096);
// everything else is < 10 % of the bytes. Grid = (X/N groups, ceil(batch / (lanes * kSeq))), fixed for
// a batch size; no allocation, no host sync: CUDA-graph capturable.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.h"
#include "scan_math.cuh"  // apriel::ex2 / rcp_ftz: MUFU forms with .ftz spelled out
#include "step_params.h"

namespace apriel {
namespace step {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(double v) { return static_cast<float>(v); }

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

// The 16 states of one channel. Streaming cache hints: the cache is touched once per layer step, so it
// should not push the layer parameters out of L2.
template <typename state_t>
struct StateIO;

template <>
struct StateIO<float> {
  __device__ __forceinline__ static void load(const void* base, int64_t off, float h[16]) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + off);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float4 v = __ldcs(p + i);
      h[4 * i] = v.x; h[4 * i + 1] = v.y; h[4 * i + 2] = v.z; h[4 * i + 3] = v.w;
    }
  }
  __device__ __forceinline__ static void store(void* base, int64_t off, const float h[16]) {
    float4* p = reinterpret_cast<float4*>(static_cast<float*>(base) + off);
#pragma unroll
    for (int i = 0; i < 4; ++i) __stcs(p + i, make_float4(h[4 * i], h[4 * i + 1], h[4 * i + 2], h[4 * i + 3]));
  }
};

template <>
struct StateIO<__nv_bfloat16> {
  __device__ __forceinline__ static void load(const void* base, int64_t off, float h[16]) {
    const uint4* p = reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(base) + off);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint4 v = __ldcs(p + i);
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // bf16 -> fp32 is a 16-bit shift
        h[8 * i + 2 * j] = __uint_as_float(w[j] << 16);
        h[8 * i + 2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
      }
    }
  }
  // fp32 math, rounded to nearest even on store.
  __device__ __forceinline__ static void store(void* base, int64_t off, const float h[16]) {
    uint4* p = reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(base) + off);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      uint32_t w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(h[8 * i + 2 * j], h[8 * i + 2 * j + 1]);
        w[j] = *reinterpret_cast<const uint32_t*>(&v);
      }
      __stcs(p + i, make_uint4(w[0], w[1], w[2], w[3]));
    }
  }
};

// 16 consecutive activations (a B or C group) kept packed in 16-byte vectors (8 registers for 16-bit
// types instead of 16 floats: the unpacked form spilled); unpacked per state inside the update loop.
template <typename act_t>
struct Packed16 {
  static constexpr int kVecs = 16 * sizeof(act_t) / 16;
  uint4 v[kVecs];
  __device__ __forceinline__ void load(const act_t* __restrict__ p) {
#pragma unroll
    for (int i = 0; i < kVecs; ++i) v[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  }
  __device__ __forceinline__ float operator()(int n) const { return to_f(reinterpret_cast<const act_t*>(v)[n]); }
};

// The 16-state update and C readout of one channel and token; get_b / get_c return B[n] / C[n].
// kTree = false (v1 only): one sequential readout chain, fewer live registers (v1 runs at an 85-register cap).
template <bool kTree = true, typename GetB, typename GetC>
__device__ __forceinline__ float ssm_update(float h[16], const float* A2s, int stride, float delta, float du,
                                            const GetB& get_b, const GetC& get_c) {
  if constexpr (!kTree) {
    float yp = 0.f;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      h[n] = __fmaf_rn(::apriel::ex2(delta * A2s[n * stride]), h[n], du * get_b(n));
      yp = __fmaf_rn(get_c(n), h[n], yp);
    }
    return yp;
  }
  // The C readout is 4 chains of 4 states combined as (s0 + s1) + (s2 + s3): fp32 addition is commutative,
  // so this sum is bit-identical under the lane permutations of v3 (4-state units XOR-permuted; bf16 state:
  // 8-state halves swapped), i.e. v2, v3 and the q-token path give the same y. Explicit fmas: the same
  // rounding in every kernel that inlines this, whatever contraction the compiler would pick.
  float s[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int n = 4 * q + m;
      // ex2.approx.ftz: the same MUFU op exp2f uses, without the denormal pre/post-scaling exp2f wraps around
      // it (3 instructions per state; a flushed denormal factor only drops a < 2^-126 relative contribution).
      h[n] = __fmaf_rn(::apriel::ex2(delta * A2s[n * stride]), h[n], du * get_b(n));
      s[q] = m == 0 ? get_c(n) * h[n] : __fmaf_rn(get_c(n), h[n], s[q]);
    }
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// silu(v) = v sigmoid(v) with the MUFU ex2 and rcp (5 instructions; the IEEE division and the non-ftz __expf
// cost ~15 with a slow-path branch). Relative error a few fp32 ulp: far inside the tests' tolerance
// (2 |torch fp32 - ref64| + 2^-20 of the scale, fp32 outputs); v -> -inf gives -0, like the reference's 0.
__device__ __forceinline__ float silu_f(float v) { return v * ::apriel::rcp_ftz(1.f + ::apriel::ex2(-::apriel::kLog2e * v)); }

// The last 4 entries (positions S-4 .. S-1, right-aligned; positions < 0 read as 0) of one conv-cache row,
// element offset `off`, position stride `ps`: one warp-uniform dtype branch per row (conv_tail_load) instead
// of one per element (load_any), and one 64-bit row offset instead of four.
template <typename T>
__device__ __forceinline__ void conv_tail_load_t(const void* base, int64_t off, int64_t ps, int S, float (&out)[4]) {
  const T* row = static_cast<const T*>(base) + off;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int pos = S - 4 + k;
    out[k] = pos >= 0 ? to_f(row[pos * ps]) : 0.f;
  }
}
__device__ __forceinline__ void conv_tail_load(const MixerStepParams& p, int64_t off, float (&out)[4]) {
  switch (p.conv_state_dtype) {
    case kBFloat16: conv_tail_load_t<__nv_bfloat16>(p.conv_state, off, p.conv_pos_stride, p.conv_state_len, out); break;
    case kFloat16: conv_tail_load_t<__half>(p.conv_state, off, p.conv_pos_stride, p.conv_state_len, out); break;
    case kFloat32: conv_tail_load_t<float>(p.conv_state, off, p.conv_pos_stride, p.conv_state_len, out); break;
    default: conv_tail_load_t<double>(p.conv_state, off, p.conv_pos_stride, p.conv_state_len, out); break;
  }
}
// The whole row when S <= 4 (16/32-bit caches; an fp64 cache takes the bit-copy path): v[4 - S + s] -> entry s.
template <typename T>
__device__ __forceinline__ void conv_tail_store_t(void* base, int64_t off, int64_t ps, int S, const float (&v)[4]) {
  T* row = static_cast<T*>(base) + off;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int pos = S - 4 + k;
    if (pos >= 0) row[pos * ps] = from_f<T>(v[k]);
  }
}
__device__ __forceinline__ void conv_tail_store(const MixerStepParams& p, int64_t off, const float (&v)[4]) {
  switch (p.conv_state_dtype) {
    case kBFloat16: conv_tail_store_t<__nv_bfloat16>(p.conv_state, off, p.conv_pos_stride, p.conv_state_len, v); break;
    case kFloat16: conv_tail_store_t<__half>(p.conv_state, off, p.conv_pos_stride, p.conv_state_len, v); break;
    default: conv_tail_store_t<float>(p.conv_state, off, p.conv_pos_stride, p.conv_state_len, v); break;
  }
}

constexpr int kRegRanks = 16;       // dt_proj ranks staged in shared memory (Apriel-H1: R = 16); more are re-read
constexpr int kMaxHalo = 3;         // W <= 4
constexpr int kThreads = 256;       // per block: 16*r channels x 256/(16 r) sequence lanes
constexpr int kMaxConvStateReg = 8; // conv-cache rows up to this length are shifted through registers

// Occupancy: bytes in flight per SM bound this kernel; 3 blocks of 256 threads (<= 85 registers).
template <typename act_t, typename state_t, int kSeq>
__global__ void __launch_bounds__(kThreads, 3) mixer_step_kernel(const MixerStepParams p) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int group_channels = p.group_channels;  // 16 * r
  const int ch_local = threadIdx.x % group_channels;
  const int lane_seq = threadIdx.x / group_channels;
  const int seq_lanes = kThreads / group_channels;
  const int g = blockIdx.x;  // x/B group (mixer.md section 2)
  const int c = g * group_channels + ch_local;
  const int n_in_head = ch_local & (kDState - 1);
  const int xs = g * kDState + n_in_head;  // x source channel = compact conv-cache row
  const int D = p.d_inner, X = p.d_xb;
  const bool compact_conv = p.conv_state_channels == X;
  const act_t* __restrict__ zxbc = static_cast<const act_t*>(p.zxbc);
  const act_t* __restrict__ dt_low = static_cast<const act_t*>(p.dt_low);
  act_t* __restrict__ y = static_cast<act_t*>(p.y);

  // Row of the s-th sequence of this thread and its cache slot: -1 = padding (or out of range: never
  // touch memory), -2 = past the batch.
  auto row_of = [&](int s) { return (blockIdx.y * kSeq + s) * seq_lanes + lane_seq; };
  auto slot_of = [&](int row) {
    if (row >= p.batch) return -2;
    const int slot = p.slot_idx != nullptr ? __ldg(p.slot_idx + row) : row;
    return slot < 0 || slot >= p.num_slots ? -1 : slot;
  };
  // The first sequence's state is requested before the parameters are staged: at small batch the
  // kernel is a chain of memory latencies (slot -> state -> math -> store), this overlaps two of them.
  int row = row_of(0), slot = slot_of(row);
  float h[kDState];
  if (slot >= 0) StateIO<state_t>::load(p.ssm_state, slot * p.ssm_slot_stride + int64_t(c) * kDState, h);

  // A2 = -exp(A_log) log2(e) (one exp2 per state and token) and the dt_proj rows of the block's
  // channels, staged once per block in shared memory as [state or rank][channel] (conflict-free reads;
  // keeping them in registers spilled).
  extern __shared__ float smem[];
  float* A2s = smem;                              // (16, group_channels)
  float* dtws = smem + kDState * group_channels;  // (16, group_channels): ranks 0..15
  for (int i = threadIdx.x; i < kDState * group_channels; i += kThreads) {
    const int n = i / group_channels, cc = g * group_channels + i % group_channels;
    A2s[i] = -expf(load_any(p.A_log, p.A_log_dtype, cc * p.A_log_stride0 + n * p.A_log_stride1)) * kLog2e;
    dtws[i] = n < p.dt_rank ? load_any(p.dt_proj_weight, p.dt_proj_weight_dtype, cc * p.dt_proj_weight_stride0 + n * p.dt_proj_weight_stride1)
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
  // The D-channel conv layout is read at the first copy of the repeat (exactly what the reference does).
  const int win_row = compact_conv ? xs : g * group_channels + n_in_head;
  const int b_off = D + X + g * kDState;                   // B[g, :]
  const int c_off = D + 2 * X + (c / kDState) * kDState;  // C[c/N, :]

  __syncthreads();  // A2s / dtws staged

#pragma unroll 1
  for (int s = 0; s < kSeq; ++s) {
    if (s > 0) {
      row = row_of(s);
      slot = slot_of(row);
      if (slot >= 0) StateIO<state_t>::load(p.ssm_state, slot * p.ssm_slot_stride + int64_t(c) * kDState, h);
    }
    if (slot == -2) continue;
    act_t* y_row = y + row * p.y_batch_stride + c;
    if (slot < 0) {  // padding row: y = 0, no state I/O
      for (int t = 0; t < p.q; ++t) y_row[t * p.y_token_stride] = from_f<act_t>(0.f);
      continue;
    }
    // Conv window: the last W-1 cached inputs of the x source channel (read before the barrier below).
    float win[kMaxHalo];
    const int64_t conv_base = slot * p.conv_slot_stride + win_row * p.conv_channel_stride;
#pragma unroll
    for (int k = 0; k < kMaxHalo; ++k) {
      win[k] = k >= kMaxHalo - (p.width - 1)
                   ? load_any(p.conv_state, p.conv_state_dtype, conv_base + (p.conv_state_len - kMaxHalo + k) * p.conv_pos_stride)
                   : 0.f;
    }
    for (int t = 0; t < p.q; ++t) {
      const act_t* __restrict__ zr = zxbc + row * p.zxbc_batch_stride + t * p.zxbc_token_stride;
      const act_t* __restrict__ dr = dt_low + row * p.dt_batch_stride + t * p.dt_token_stride;
      float dt = 0.f;
#pragma unroll
      for (int k = 0; k < kRegRanks; ++k) {
        if (k < p.dt_rank) dt += dtws[k * group_channels + ch_local] * to_f(dr[k]);
      }
      for (int k = kRegRanks; k < p.dt_rank; ++k) {  // R > 16 only
        dt += load_any(p.dt_proj_weight, p.dt_proj_weight_dtype, c * p.dt_proj_weight_stride0 + k * p.dt_proj_weight_stride1) *
              to_f(dr[k]);
      }
      // dt_proj's own bias, then the scan's delta_bias (the same vector again): mixer.md 3.4.
      const float v = (dt + dt_bias) + dt_bias;
      const float delta = v > 20.f ? v : log1pf(expf(v));
      const float x_new = to_f(zr[D + xs]);
      const float pre = conv_b + w4[0] * win[0] + w4[1] * win[1] + w4[2] * win[2] + w4[3] * x_new;
      win[0] = win[1];
      win[1] = win[2];
      win[2] = x_new;
      const float u = silu_f(pre);
      const float du = delta * u;
      const float* a2 = A2s + ch_local;
      float yp;
      if (p.vec_inputs) {
        Packed16<act_t> bv, cv;
        bv.load(zr + b_off);
        cv.load(zr + c_off);
        yp = ssm_update<false>(h, a2, group_channels, delta, du, bv, cv);
      } else {  // rows not 16-byte aligned (a strided view): element loads
        const act_t* bp = zr + b_off;
        const act_t* cp = zr + c_off;
        yp = ssm_update<false>(h, a2, group_channels, delta, du, [&](int n) { return to_f(bp[n]); },
                        [&](int n) { return to_f(cp[n]); });
      }
      const float yv = (yp + d_skip * u) * silu_f(to_f(zr[c]));
      y_row[t * p.y_token_stride] = from_f<act_t>(yv);
    }
    StateIO<state_t>::store(p.ssm_state, slot * p.ssm_slot_stride + int64_t(c) * kDState, h);
  }

  // Conv caches: every window of the block has been read; one writer per row shifts it by q. Compact
  // rows are written by the first repeat of their x channel, D-layout rows by their own channel (each
  // shifts its own old entries, like the reference).
  __syncthreads();
  const bool writer = !compact_conv || ch_local < kDState;
  if (!writer) return;
  const int wrow = compact_conv ? xs : c;
  const int S = p.conv_state_len;
#pragma unroll 1
  for (int s = 0; s < kSeq; ++s) {
    row = row_of(s);
    slot = slot_of(row);
    if (slot < 0) continue;
    const int64_t base = slot * p.conv_slot_stride + wrow * p.conv_channel_stride;
    auto new_entry = [&](int sp) -> float {  // entry sp of [old window ; q new inputs][q:]
      const int src = sp + p.q;
      if (src < S) return load_any(p.conv_state, p.conv_state_dtype, base + src * p.conv_pos_stride);
      return to_f(zxbc[row * p.zxbc_batch_stride + (src - S) * p.zxbc_token_stride + D + xs]);
    };
    if (S <= kMaxConvStateReg && p.conv_state_dtype != kFloat64) {
      // All reads first (independent, one round trip), then all writes.
      float vals[kMaxConvStateReg];
#pragma unroll
      for (int sp = 0; sp < kMaxConvStateReg; ++sp) vals[sp] = sp < S ? new_entry(sp) : 0.f;
#pragma unroll
      for (int sp = 0; sp < kMaxConvStateReg; ++sp) {
        if (sp < S) store_any(p.conv_state, p.conv_state_dtype, base + sp * p.conv_pos_stride, vals[sp]);
      }
    } else {
      // Ascending positions: entry sp reads sp + q > sp before anything at or above it is written; bit
      // copies keep an fp64 cache exact.
      for (int sp = 0; sp < S; ++sp) {
        const int src = sp + p.q;
        if (src < S) {
          copy_any(p.conv_state, p.conv_state_dtype, base + sp * p.conv_pos_stride, base + src * p.conv_pos_stride);
        } else {
          store_any(p.conv_state, p.conv_state_dtype, base + sp * p.conv_pos_stride, new_entry(sp));
        }
      }
    }
  }
}

template <typename act_t, typename state_t>
void launch_with_state(const MixerStepParams& p, cudaStream_t stream) {
  const int seq_lanes = kThreads / p.group_channels;
  const int per_block = seq_lanes * p.seq_per_thread;
  const dim3 grid(p.d_xb / kDState, (p.batch + per_block - 1) / per_block);
  const size_t smem = 2 * kDState * p.group_channels * sizeof(float);  // 8 KB for r = 4, 32 KB max
  // 3 sequences-per-thread variants x 2 state dtypes per activation dtype: 6 instantiations per .cu file.
  switch (p.seq_per_thread) {
    case 4: mixer_step_kernel<act_t, state_t, 4><<<grid, kThreads, smem, stream>>>(p); break;
    case 2: mixer_step_kernel<act_t, state_t, 2><<<grid, kThreads, smem, stream>>>(p); break;
    default: mixer_step_kernel<act_t, state_t, 1><<<grid, kThreads, smem, stream>>>(p); break;
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
