// Fused Apriel-H1 decode step, version 2 (the default; APRIEL_STEP_KERNEL=v1 selects step_kernel.cuh).
//
// Same semantics as v1 (mixer.md section 4, algorithm in step_kernel.cuh's header). What changed, and
// why: v1's block was a chain of serialized memory latencies (state load || parameter staging -> barrier
// -> window/input loads -> math -> barrier -> conv-writer re-read -> stores), so its time was ~6-7 us per
// block whatever the bytes (hot ~= cold, docs/notes/step.md). v2 removes every dependency that is not
// a true data dependency:
//   * no shared memory and no __syncthreads: each thread loads its own channel's parameters (A_log,
//     dt_proj row, conv taps, biases, D) straight into registers, all issued together;
//   * warp mapping: the r = D/X channels that share one x source channel (one compact conv-cache row) sit
//     in the SAME warp (lane = j * w + i, w = 32 / r source channels per warp, j = repeat). Only the
//     repeat-0 lane reads that row; the others get the window by __shfl_sync, so nobody reads a row after
//     its writer rewrote it and no barrier is needed. The writer shifts the row from registers (a
//     sliding 4-entry register window), not by re-reading it;
//   * issue order per thread: parameters -> [PDL wait] -> token-0 inputs (z, x, B, C, dt_low: they depend
//     on the row only) and slot indices -> states and conv rows of ALL the thread's kSeq sequences (one
//     latency for all of them) -> math -> stores. Two memory latencies per thread in the critical path;
//   * warps never wait for each other, so a resident warp's math hides another's loads; blocks are
//     1-4 warps of the same channels (different sequences): at b1 the 128 warps are 128 blocks on 128 SMs.
// Programmatic dependent launch (APRIEL_STEP_PDL=1, sm_90): the parameter loads run before
// griddepcontrol.wait, i.e. overlapped with the previous kernel's tail. Contract: the layer parameters
// are not written by the kernel launched just before the step (true in a decode graph).
//
// Bound: memory. A warp reads 32 channels x 64 B of fp32 state (chunks of w * 64 B contiguous, full
// sectors); bytes in flight per SM = resident threads x kSeq x 64 B.
#pragma once
#include "step_kernel.cuh"  // shared helpers: to_f / from_f, load_any / store_any / copy_any, StateIO, Packed16

namespace apriel {
namespace step {
namespace v2 {

constexpr int kWarp = 32;
constexpr int kWin = 4;  // sliding conv window in registers: W <= 4; rows up to 4 entries shifted from registers

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// One token's inputs of one sequence for one channel, as loaded (no arithmetic on them yet, so issuing
// them never waits for their arrival): B and C groups and dt_low (ranks 0..15) packed, z and x.
template <typename act_t>
struct TokenIn {
  Packed16<act_t> b, c, dt;
  act_t z, x;
};

// Minimum resident 128-thread blocks per SM, i.e. the register cap (128 / 168 / 255 for kSeq 1 / 2 / 4,
// 168 for q > 1), chosen so that 16-bit inputs do not spill; state bytes in flight per SM (fp32 state):
// kSeq 1: 512 threads x 64 B = 32 KB, kSeq 2: 384 x 128 B = 48 KB, kSeq 4: 256 x 256 B = 64 KB. Issuing
// every load of a thread at once costs registers: that is the trade. kMulti (q > 1, speculative
// decoding) keeps dt_proj in registers across the token loop.
// One channel's dt_proj row, conv taps (right-aligned: w4[4 - W + k] = w[k]), conv bias, dt bias and D into
// registers (shared by v2 and v3; layer parameters are never written by the preceding kernel, so this runs
// before the PDL wait). Returns whether dtw holds packed 16-bit words: with vec_dtw and a 16-bit dtype the words
// are parked bit for bit in dtw[0..7] and the caller unpacks them after its state loads are issued.
template <int kRanks, int kTaps>
__device__ __forceinline__ bool load_channel_params(const MixerStepParams& p, int c, int conv_ch, bool valid,
                                                    float (&dtw)[kRanks], float (&w4)[kTaps], float& conv_b,
                                                    float& dt_bias, float& d_skip) {
  const bool dtw_packed = p.vec_dtw && p.dt_proj_weight_dtype != kFloat32;
  if (p.vec_dtw && valid) {
    const uint4* pw = reinterpret_cast<const uint4*>(static_cast<const char*>(p.dt_proj_weight) +
                                                     c * p.dt_proj_weight_stride0 * (dtw_packed ? 2 : 4));
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const uint4 a = v < 2 || !dtw_packed ? __ldg(pw + v) : make_uint4(0u, 0u, 0u, 0u);
      dtw[4 * v] = __uint_as_float(a.x); dtw[4 * v + 1] = __uint_as_float(a.y);
      dtw[4 * v + 2] = __uint_as_float(a.z); dtw[4 * v + 3] = __uint_as_float(a.w);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kRanks; ++k) {
      dtw[k] = valid && k < p.dt_rank
                   ? load_any(p.dt_proj_weight, p.dt_proj_weight_dtype, c * p.dt_proj_weight_stride0 + k * p.dt_proj_weight_stride1)
                   : 0.f;
    }
  }
#pragma unroll
  for (int k = 0; k < kTaps; ++k) {
    const int tap = k - (kTaps - p.width);
    w4[k] = valid && tap >= 0
                ? load_any(p.conv_weight, p.conv_weight_dtype, conv_ch * p.conv_weight_stride0 + tap * p.conv_weight_stride1)
                : 0.f;
  }
  if (valid) {
    if (p.conv_bias != nullptr) conv_b = load_any(p.conv_bias, p.conv_bias_dtype, conv_ch * p.conv_bias_stride);
    dt_bias = load_any(p.dt_proj_bias, p.dt_proj_bias_dtype, c * p.dt_proj_bias_stride);
    d_skip = load_any(p.D_skip, p.D_skip_dtype, c * p.D_skip_stride);
  }
  return dtw_packed;
}

template <int kSeq, bool kMulti>
struct MinBlocks { static constexpr int value = kMulti ? 3 : kSeq == 1 ? 4 : kSeq == 2 ? 3 : 2; };

template <typename act_t, typename state_t, int kSeq, bool kMulti>
__global__ void __launch_bounds__(128, (MinBlocks<kSeq, kMulti>::value)) mixer_step_v2_kernel(const MixerStepParams p) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int D = p.d_inner, X = p.d_xb;
  // r = D / X is a power of two dividing 16: shifts instead of runtime integer divisions (~75 instructions
  // per thread, i.e. per row in v2).
  const int log2r = __clz(X) - __clz(D);
  const int r = 1 << log2r;
  const int log2w = 5 - log2r;
  const int w = 1 << log2w;  // source channels per warp
  const int lane = threadIdx.x;
  const int j = lane >> log2w, i = lane & (w - 1);  // repeat, source channel within the warp
  const int xs = blockIdx.x * w + i;    // x source channel = compact conv-cache row
  const bool valid = xs < X;            // r = 1 with X % 32 = 16: the upper half-warp idles
  const int g = xs >> 4, n_in = xs & (kDState - 1);
  const int c = g * kDState * r + j * kDState + n_in;  // mixer channel
  const int seq_warp = blockIdx.y * blockDim.y + threadIdx.y;
  const bool compact_conv = p.conv_state_channels == X;
  const bool writer = valid && (!compact_conv || j == 0);  // owns (and rewrites) a conv-cache row
  const int own_row = compact_conv ? xs : c;               // D layout: own row; repeat 0's row = the window row
  const act_t* __restrict__ zxbc = static_cast<const act_t*>(p.zxbc);
  const act_t* __restrict__ dt_low = static_cast<const act_t*>(p.dt_low);
  act_t* __restrict__ y = static_cast<act_t*>(p.y);

  // ---- layer parameters (never written by the preceding kernel: read before the PDL wait). Loaded raw;
  // the arithmetic on them comes after the state loads are issued, so no load waits for another.
  float A2[kDState];  // A_log, turned into -exp(A_log) log2(e) below (one exp2 per state and token)
  float dtw[kRegRanks];
  float w4[kWin];  // conv taps right-aligned: w4[4 - W + k] = w[k]
  float conv_b = 0.f, dt_bias = 0.f, d_skip = 0.f;
  const int conv_ch = p.repeat_kv_before_conv ? c : xs;
  // Contiguous rows are read as 16-byte vectors: lanes of a warp read rows 64 B (A_log) / 32 B (dt_proj)
  // apart, so a scalar load per element costs one L1 wavefront per touched line per element: at b256 the
  // per-warp parameter reads would cost more L1 time than the state itself.
  if (p.vec_A && valid) {
    const float4* pa = reinterpret_cast<const float4*>(static_cast<const float*>(p.A_log) + c * p.A_log_stride0);
#pragma unroll
    for (int v = 0; v < kDState / 4; ++v) {
      const float4 a = __ldg(pa + v);
      A2[4 * v] = a.x; A2[4 * v + 1] = a.y; A2[4 * v + 2] = a.z; A2[4 * v + 3] = a.w;
    }
  } else {
#pragma unroll
    for (int n = 0; n < kDState; ++n) {
      A2[n] = valid ? load_any(p.A_log, p.A_log_dtype, c * p.A_log_stride0 + n * p.A_log_stride1) : 0.f;
    }
  }
  // vec_dtw with a 16-bit dtype: the packed words are parked bit for bit in dtw[0..7] and unpacked after
  // the state loads are issued (unpacking is arithmetic on the loaded value: it would wait for it here).
  const bool dtw_packed = load_channel_params(p, c, conv_ch, valid, dtw, w4, conv_b, dt_bias, d_skip);

  // Everything below may read what the previous kernel wrote.
  pdl_wait();
  pdl_launch_dependents();

  const int b_off = D + X + g * kDState;           // B[g, :]
  const int c_off = D + 2 * X + (c & ~(kDState - 1));  // C[c/N, :]
  // Lanes past the channels (r = 1 with X % 32 = 16, the only case with invalid lanes: xs in [X, X + 16))
  // load the C group of the channel 16 below, so every lane of a live row loads in bounds and the token
  // registers need no zero-initialisation (which cost ~50 16-bit merges per thread); their values are unused.
  const int c_off_ld = valid ? c_off : c_off - kDState;
  // Token t's inputs of row `row`, loads only.
  auto load_token = [&](int row, int t) {
    TokenIn<act_t> in;
    const act_t* __restrict__ zr = zxbc + row * p.zxbc_batch_stride + t * p.zxbc_token_stride;
    const act_t* __restrict__ dr = dt_low + row * p.dt_batch_stride + t * p.dt_token_stride;
    if (p.vec_inputs) {
      in.b.load(zr + b_off);
      in.c.load(zr + c_off_ld);
    } else {  // rows not 16-byte aligned (a strided view): element loads
#pragma unroll
      for (int n = 0; n < kDState; ++n) {
        reinterpret_cast<act_t*>(in.b.v)[n] = zr[b_off + n];
        reinterpret_cast<act_t*>(in.c.v)[n] = zr[c_off_ld + n];
      }
    }
    if (p.vec_dt) {  // R = 16, rows 16-byte aligned: 16-byte vector loads (fewer registers in flight)
      in.dt.load(dr);
    } else {
#pragma unroll
      for (int k = 0; k < kRegRanks; ++k) reinterpret_cast<act_t*>(in.dt.v)[k] = k < p.dt_rank ? dr[k] : from_f<act_t>(0.f);
    }
    in.z = zr[c];
    in.x = zr[D + xs];
    return in;
  };
  // delta of token t of row `row`: dt_proj dot + both biases (mixer.md 3.4), softplus.
  auto delta_of = [&](const TokenIn<act_t>& in, int row, int t) {
    float dt = 0.f;
#pragma unroll
    for (int k = 0; k < kRegRanks; ++k) dt += dtw[k] * in.dt(k);  // ranks >= dt_rank are 0 in both
    for (int k = kRegRanks; k < p.dt_rank; ++k) {  // R > 16 only: re-read
      dt += load_any(p.dt_proj_weight, p.dt_proj_weight_dtype, c * p.dt_proj_weight_stride0 + k * p.dt_proj_weight_stride1) *
            to_f(dt_low[row * p.dt_batch_stride + t * p.dt_token_stride + k]);
    }
    const float v = (dt + dt_bias) + dt_bias;
    return v > 20.f ? v : log1pf(expf(v));
  };

  // ---- rows of this thread: row_s = seq_warp * kSeq + s. Slot indices, then the token-0 inputs (they
  // depend on the row only), both in flight together.
  int row[kSeq];
  bool live[kSeq];  // row < batch and lane valid
  int slot_raw[kSeq];
#pragma unroll
  for (int s = 0; s < kSeq; ++s) {
    row[s] = seq_warp * kSeq + s;
    live[s] = row[s] < p.batch && valid;
    slot_raw[s] = row[s] >= p.batch ? -2 : p.slot_idx != nullptr ? __ldg(p.slot_idx + row[s]) : row[s];
  }
  TokenIn<act_t> tin[kSeq];  // rows past the batch leave theirs unset: they are skipped below (slot -2)
#pragma unroll
  for (int s = 0; s < kSeq; ++s) {
    if (row[s] < p.batch) tin[s] = load_token(row[s], 0);
  }
  int slot[kSeq];  // -1 = padding or out of range (no state I/O), -2 = past the batch (warp-uniform)
#pragma unroll
  for (int s = 0; s < kSeq; ++s) {
    const int sl = slot_raw[s];
    slot[s] = row[s] >= p.batch ? -2 : sl < 0 || sl >= p.num_slots ? -1 : sl;
  }

  // ---- states and conv rows of all kSeq sequences, issued together.
  float h[kSeq][kDState];
  float crow[kSeq][kWin];  // last 4 entries of the own conv row, right-aligned (entry S - 4 + k)
  const int S = p.conv_state_len;
#pragma unroll
  for (int s = 0; s < kSeq; ++s) {
    if (live[s] && slot[s] >= 0) {
      StateIO<state_t>::load(p.ssm_state, slot[s] * p.ssm_slot_stride + int64_t(c) * kDState, h[s]);
    } else {
#pragma unroll
      for (int n = 0; n < kDState; ++n) h[s][n] = 0.f;
    }
    if (writer && live[s] && slot[s] >= 0) {
      conv_tail_load(p, slot[s] * p.conv_slot_stride + own_row * p.conv_channel_stride, crow[s]);
    } else {
#pragma unroll
      for (int k = 0; k < kWin; ++k) crow[s][k] = 0.f;
    }
  }

  // ---- arithmetic on the parameters (their loads have long been issued)
#pragma unroll
  // MUFU ex2 instead of the precise expf (2 instructions instead of ~9, 16 per thread and row here): A's
  // relative error grows to a few ulp, i.e. exp(delta A) moves by |delta A| x ~4e-7 relative, which is
  // largest (~1.5e-7) where |delta A| ~ 1: below one fp32 ulp of the state's scale.
  for (int n = 0; n < kDState; ++n) A2[n] = -::apriel::ex2(A2[n] * kLog2e) * kLog2e;
  if (dtw_packed) {  // descending k: word k/2 <= k is read before dtw[k] overwrites it
    const bool bf16 = p.dt_proj_weight_dtype == kBFloat16;
#pragma unroll
    for (int k = kRegRanks - 1; k >= 0; --k) {
      const uint32_t word = __float_as_uint(dtw[k / 2]);
      const uint16_t bits = (k & 1) ? static_cast<uint16_t>(word >> 16) : static_cast<uint16_t>(word & 0xffffu);
      dtw[k] = bf16 ? __uint_as_float(static_cast<uint32_t>(bits) << 16) : __half2float(__ushort_as_half(bits));
    }
  }

  // ---- math and stores, sequence by sequence (control flow is warp-uniform: the row is the warp's).
#pragma unroll
  for (int s = 0; s < kSeq; ++s) {
    if (slot[s] == -2) continue;
    act_t* y_row = y + row[s] * p.y_batch_stride + c;
    if (slot[s] == -1) {  // padding row: y = 0, no state I/O
      if (valid) {
        for (int t = 0; t < p.q; ++t) y_row[t * p.y_token_stride] = from_f<act_t>(0.f);
      }
      continue;
    }
    const int q = kMulti ? p.q : 1;
    for (int t = 0; t < q; ++t) {
      const TokenIn<act_t> in = t == 0 || !valid ? tin[s] : load_token(row[s], t);
      // Window = last W-1 entries of [old row ; x of tokens < t] of the repeat-0 lane's row.
      float win[kWin - 1];
#pragma unroll
      for (int k = 0; k < kWin - 1; ++k) {
        const float v = __shfl_sync(0xffffffffu, crow[s][k + 1], i);
        win[k] = k >= kWin - p.width ? v : 0.f;
      }
      const float x_new = to_f(in.x);
      const float pre = conv_b + w4[0] * win[0] + w4[1] * win[1] + w4[2] * win[2] + w4[3] * x_new;
#pragma unroll
      for (int k = 0; k < kWin - 1; ++k) crow[s][k] = crow[s][k + 1];
      crow[s][kWin - 1] = x_new;
      if (!valid) continue;
      const float delta = delta_of(in, row[s], t);
      const float u = silu_f(pre);
      const float du = delta * u;
      const float yp = ssm_update(h[s], A2, 1, delta, du, in.b, in.c);
      const float yv = __fmaf_rn(d_skip, u, yp) * silu_f(to_f(in.z));
      y_row[t * p.y_token_stride] = from_f<act_t>(yv);
    }
    if (!valid) continue;
    StateIO<state_t>::store(p.ssm_state, slot[s] * p.ssm_slot_stride + int64_t(c) * kDState, h[s]);
    if (!writer) continue;
    // Conv row shifted by q: entry sp of [old row ; q new x][q:].
    const int64_t base = slot[s] * p.conv_slot_stride + own_row * p.conv_channel_stride;
    if (S <= kWin && p.conv_state_dtype != kFloat64) {
      // The register window holds the last 4 entries of the concatenation: the whole new row.
      conv_tail_store(p, base, crow[s]);
    } else {
      // Long rows or an fp64 cache: ascending bit copies (entry sp reads sp + q > sp before anything at
      // or above it is written; only this thread touches the row), new inputs re-read.
      for (int sp = 0; sp < S; ++sp) {
        const int src = sp + p.q;
        if (src < S) {
          copy_any(p.conv_state, p.conv_state_dtype, base + sp * p.conv_pos_stride, base + src * p.conv_pos_stride);
        } else {
          const float xv = to_f(zxbc[row[s] * p.zxbc_batch_stride + (src - S) * p.zxbc_token_stride + D + xs]);
          store_any(p.conv_state, p.conv_state_dtype, base + sp * p.conv_pos_stride, xv);
        }
      }
    }
  }
}

template <typename act_t, typename state_t, int kSeq, bool kMulti>
void launch_seq(const MixerStepParams& p, cudaStream_t stream) {
  const int r = p.d_inner / p.d_xb;
  const int w = kWarp / r;
  const int src_warps = (p.d_xb + w - 1) / w;
  const int seq_warps = (p.batch + kSeq - 1) / kSeq;
  // Warps of a block share channels (parameters hit L1) and take different sequences; small batches get
  // 1-warp blocks so the channel warps spread over all SMs.
  const int wpb = seq_warps >= 4 ? 4 : seq_warps >= 2 ? 2 : 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(src_warps, (seq_warps + wpb - 1) / wpb);
  cfg.blockDim = dim3(kWarp, wpb);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = p.pdl ? 1 : 0;
  APRIEL_CUDA_CHECK(cudaLaunchKernelEx(&cfg, mixer_step_v2_kernel<act_t, state_t, kSeq, kMulti>, p));
}

template <typename act_t, typename state_t>
void launch_state(const MixerStepParams& p, cudaStream_t stream) {
  if (p.q > 1) {  // the host sets seq_per_thread = 1 for q > 1
    launch_seq<act_t, state_t, 1, true>(p, stream);
    return;
  }
  switch (p.seq_per_thread) {
    case 4: launch_seq<act_t, state_t, 4, false>(p, stream); break;
    case 2: launch_seq<act_t, state_t, 2, false>(p, stream); break;
    default: launch_seq<act_t, state_t, 1, false>(p, stream); break;
  }
}

template <typename act_t>
void launch(const MixerStepParams& p, bool ssm_state_bf16, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (ssm_state_bf16) {
    launch_state<act_t, __nv_bfloat16>(p, s);
  } else {
    launch_state<act_t, float>(p, s);
  }
}

}  // namespace v2
}  // namespace step
}  // namespace apriel
