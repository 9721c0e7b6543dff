// Causal depthwise conv1d kernels (forward, backward, update) and their launchers, templated on the
// activation dtype T and the width W (2..4). Instantiated once per dtype by conv1d_<dtype>.cu.
//
// Forward, token-major (the fast path; x is a (batch, seqlen, dim) activation such as a column slice of
//   the in_proj output): a thread owns kCh = 16/sizeof(T) consecutive channels (one 16-byte vector) x
//   kTok consecutive tokens, reads the W-1 halo tokens before its tile again (L1/L2 hits), issues all its
//   loads before any math (memory-level parallelism), keeps a sliding window of W inputs in registers and
//   stores one vector per token. A warp spans 32 vectors of one token row (512 contiguous bytes).
//   Bound by DRAM bandwidth: 2 bytes read + 2 written per element in bf16.
// Backward, token-major: same mapping with 4 channels per thread (half the registers of the forward: the
//   thread also carries dweight accumulators). A thread streams positions p = t0-(W-1) .. t0+kTok+W-2,
//   recomputing pre[p] and dpre[p] = dout[p] * act'(pre[p]) in a window, emitting dx[p-(W-1)] once the
//   W dpre values it needs exist. dweight/dbias are summed per thread, then per block over its token
//   lanes (shared memory, fixed order), written as per-(batch, split) partials, and a second kernel sums
//   the partials in split order: deterministic, no float atomics.
// Generic (any strides, any dim): one element per thread (forward) or one channel x a strided token
//   loop (backward), consecutive threads on the unit-stride axis. Used for channel-major data and for
//   token-major data that is not 16-byte aligned or has dim % 8 != 0.
// Update: one thread per (row, channel); the conv_state row is shifted in place in ascending order, so
//   every element is read before it is overwritten.
// Stream variants (APRIEL_CONV1D_FWD_IMPL / APRIEL_CONV1D_BWD_IMPL = stream|async; section below): a
//   thread walks a contiguous run of tokens with its window in registers, one wave of blocks; "async"
//   stages the chunks through shared memory with cp.async instead of register double buffers. Default: the tile kernels, until an
//   H100 run decides (docs/notes/conv1d.md).
// Status (H100, b1 L8192 bf16 silu; bench/results/conv1d_h100_vecw_default.json): tile forward 4096 ch
//   0.065 ms = 69% of the copy ceiling, 1024 ch 0.024 ms, forward+backward 0.29 ms (backward 0.21); bars
//   0.050 / 0.016 / 0.18. Limits found by reading (docs/notes/conv1d.md): halo re-reads per 8-token tile,
//   weights reloaded per tile (50 MB of L2 traffic at 4096 ch), a ragged last wave of short blocks; in the
//   backward 1.75x/1.375x x/dout re-reads, 8-byte loads and no prefetch. The stream kernels remove these.
// Session 2 (bench/results/s2/conv1d_h100_s2.json): async is the default; fwd 4096 ch 0.0596 ms eager /
//   0.0556 graph, bwd 0.140 ms (1.44 TB/s), fwd+bwd 0.209. Session 3 variants (deep, fused, wide,
//   channel-major vector forward) are selectable and unmeasured: docs/notes/conv1d.md, "Session 3".
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include <cooperative_groups.h>

#include "conv1d_params.h"
#include "cuda_check.h"
#include "../common/scan_math.cuh"
#include "kernel_registry.h"

namespace apriel {
namespace conv1d {

// ---------------------------------------------------------------------------------------- conversions
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

template <typename A> __device__ __forceinline__ A to_acc(__half v) { return static_cast<A>(__half2float(v)); }
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 v) { return static_cast<A>(__bfloat162float(v)); }
template <typename A> __device__ __forceinline__ A to_acc(float v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A to_acc(double v) { return static_cast<A>(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

// A scalar of a small side tensor whose dtype is only known at run time (ScalarCode).
template <typename A>
__device__ __forceinline__ A load_any(const void* ptr, int64_t idx, int code) {
  switch (code) {
    case kHalf: return to_acc<A>(static_cast<const __half*>(ptr)[idx]);
    case kBFloat16: return to_acc<A>(static_cast<const __nv_bfloat16*>(ptr)[idx]);
    case kFloat: return static_cast<A>(static_cast<const float*>(ptr)[idx]);
    default: return static_cast<A>(static_cast<const double*>(ptr)[idx]);
  }
}

template <typename A>
__device__ __forceinline__ void store_any(void* ptr, int64_t idx, int code, A v) {
  switch (code) {
    case kHalf: static_cast<__half*>(ptr)[idx] = __float2half_rn(static_cast<float>(v)); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(ptr)[idx] = __float2bfloat16_rn(static_cast<float>(v)); break;
    case kFloat: static_cast<float*>(ptr)[idx] = static_cast<float>(v); break;
    default: static_cast<double*>(ptr)[idx] = static_cast<double>(v); break;
  }
}

// Round through T, as the reference does when it moves a value into the activation dtype.
template <typename T, typename A>
__device__ __forceinline__ A round_to(A v) { return to_acc<A>(from_acc<T>(v)); }

template <typename A> __device__ __forceinline__ A sigmoid(A v);
// MUFU ex2 and rcp in their .ftz forms (~2 ulp each; an IEEE division costs ~8 instructions, and __expf /
// __fdividef add a denormal-range fix-up of 3 more): the error stays far below bf16/fp16 rounding and
// ~1e-7 relative in fp32. Why it matters: the forward and backward are issue-bound, not DRAM-bound (ncu,
// session 3: 185 instructions per thread-token at 47 % issue in the forward).
template <> __device__ __forceinline__ float sigmoid<float>(float v) { return ::apriel::sigmoid_fast(v); }
template <> __device__ __forceinline__ double sigmoid<double>(double v) { return 1.0 / (1.0 + exp(-v)); }

// Branch-free in the runtime flag: the sigmoid is always computed and the flag selects (FSEL) instead of a
// branch around each element's sigmoid (the forward's SASS had one BRA per channel per token).
template <typename A>
__device__ __forceinline__ A activate(A pre, bool silu) {
  const A s = sigmoid(pre);
  return pre * (silu ? s : A(1));
}

// d act(pre) / d pre.
template <typename A>
__device__ __forceinline__ A activate_grad(A pre, bool silu) {
  const A s = sigmoid(pre);
  return silu ? s * (A(1) + pre * (A(1) - s)) : A(1);
}

// ------------------------------------------------------------------------------------ vector memory ops
template <int Bytes> struct VecOf;
template <> struct VecOf<2> { using type = uint16_t; };
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<16> { using type = uint4; };

// N consecutive elements of T at a (N*sizeof(T))-aligned address, as one vector.
template <typename T, int N>
struct Pack {
  using V = typename VecOf<N * sizeof(T)>::type;
  V v;
  __device__ __forceinline__ void load(const T* ptr) { v = *reinterpret_cast<const V*>(ptr); }
  __device__ __forceinline__ void zero() {
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = from_acc<T>(acc_t<T>(0));
  }
  template <typename A>
  __device__ __forceinline__ A get(int i) const { return to_acc<A>(reinterpret_cast<const T*>(&v)[i]); }
};

template <typename T, int N, typename A>
__device__ __forceinline__ void store_pack(T* ptr, const A (&vals)[N]) {
  Pack<T, N> p;
  T* e = reinterpret_cast<T*>(&p.v);
#pragma unroll
  for (int i = 0; i < N; ++i) e[i] = from_acc<T>(vals[i]);
  *reinterpret_cast<typename Pack<T, N>::V*>(ptr) = p.v;
}

__device__ __forceinline__ int seq_at(const ConvParams& p, int b, int t) {
  // Positions before token 0 (the initial state) belong to the document of token 0.
  return p.seq_idx == nullptr ? 0 : p.seq_idx[b * p.seq_stride_b + int64_t(max(t, 0)) * p.seq_stride_l];
}

// The vectorised kernels are compiled twice inside one __global__ (kSeq = packed sequences or not): without
// seq_idx every document test folds away, saving a select per tap and element.
template <bool kSeq>
__device__ __forceinline__ int seq_of(const ConvParams& p, int b, int t) { return kSeq ? seq_at(p, b, t) : 0; }
template <bool kSeq>
__device__ __forceinline__ bool same_doc(int a, int b) { return !kSeq || a == b; }

// Pre-activation of one channel of one output token: bias + sum_k w[k] x_k over the taps k = 0 .. W-1 in that
// order (every forward and backward variant sums in this order, so they agree bit for bit), a tap in another
// document than the output token (seq_out) counting 0. x(k) / seq(k): tap k's input value and document id, so
// callers index their own windows (a shifting window, or halo ++ chunk rows with static indices).
template <bool kSeq, int W, typename A, typename X, typename S>
__device__ __forceinline__ A conv_pre(const A (&w)[W], A bias, int seq_out, X&& x, S&& seq) {
  A acc = bias;
#pragma unroll
  for (int k = 0; k < W; ++k) acc += w[k] * (same_doc<kSeq>(seq(k), seq_out) ? x(k) : A(0));
  return acc;
}
// The shifting-window form: taps in rows 0 .. W-1 of xw (channel i) / sw, the output token in row W-1.
template <bool kSeq, int W, int kCh, typename A>
__device__ __forceinline__ A conv_pre_window(const A (&w)[W], A bias, const A (&xw)[W][kCh], const int (&sw)[W], int i) {
  return conv_pre<kSeq>(w, bias, sw[W - 1], [&](int k) { return xw[k][i]; }, [&](int k) { return sw[k]; });
}

// N rows x W taps of a (rows, taps) side tensor stored as S: one unrolled batch of independent loads.
template <typename A, typename S, int N, int W>
__device__ __forceinline__ void load_rows_as(const void* ptr, int64_t stride_r, int64_t stride_k, int r0,
                                             A (&out)[N][W]) {
  const S* base = static_cast<const S*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int k = 0; k < W; ++k) out[i][k] = to_acc<A>(base[(r0 + i) * stride_r + k * stride_k]);
}

// The dtype switch sits outside the unrolled loads: a switch per element would turn the loads into a
// chain of dependent branches (one memory round trip each), which dominated the kernels' time.
template <typename A, int N, int W>
__device__ __forceinline__ void load_rows(const void* ptr, int code, int64_t stride_r, int64_t stride_k, int r0,
                                          A (&out)[N][W]) {
  switch (code) {
    case kHalf: load_rows_as<A, __half, N, W>(ptr, stride_r, stride_k, r0, out); break;
    case kBFloat16: load_rows_as<A, __nv_bfloat16, N, W>(ptr, stride_r, stride_k, r0, out); break;
    case kFloat: load_rows_as<A, float, N, W>(ptr, stride_r, stride_k, r0, out); break;
    default: load_rows_as<A, double, N, W>(ptr, stride_r, stride_k, r0, out); break;
  }
}

// M contiguous elements of S starting at element `offset` of a 16-byte aligned buffer, read with the
// widest vector that divides M * sizeof(S) (the chunk start is then aligned to that width as well,
// since chunks are consecutive multiples of M elements).
template <typename A, typename S, int M>
__device__ __forceinline__ void load_contig_as(const void* ptr, int64_t offset, A* out) {
  constexpr int kBytes = M * int(sizeof(S));
  constexpr int kV = kBytes % 16 == 0 ? 16 : kBytes % 8 == 0 ? 8 : kBytes % 4 == 0 ? 4 : 2;
  using V = typename VecOf<kV>::type;
  const V* src = reinterpret_cast<const V*>(static_cast<const S*>(ptr) + offset);
  V buf[kBytes / kV];
#pragma unroll
  for (int j = 0; j < kBytes / kV; ++j) buf[j] = src[j];
  const S* e = reinterpret_cast<const S*>(buf);
#pragma unroll
  for (int m = 0; m < M; ++m) out[m] = to_acc<A>(e[m]);
}

template <typename A, int M>
__device__ __forceinline__ void load_contig(const void* ptr, int code, int64_t offset, A* out) {
  switch (code) {
    case kHalf: load_contig_as<A, __half, M>(ptr, offset, out); break;
    case kBFloat16: load_contig_as<A, __nv_bfloat16, M>(ptr, offset, out); break;
    case kFloat: load_contig_as<A, float, M>(ptr, offset, out); break;
    default: load_contig_as<A, double, M>(ptr, offset, out); break;
  }
}

// kVecW (compile time, so the default scalar kernels are unchanged by the vector option): read the
// weight/bias as vectors; the host sets it only for contiguous, 16-byte aligned weight and bias.
template <typename A, int N, int W, bool kVecW = false>
__device__ __forceinline__ void load_weights(const ConvParams& p, int c0, A (&w)[N][W], A (&bias)[N]) {
  if (kVecW) {
    // Rows c0 .. c0+N-1 of a contiguous (dim, W) weight are N*W consecutive elements.
    load_contig<A, N * W>(p.weight, p.weight_dtype, int64_t(c0) * W, &w[0][0]);
    if (p.bias != nullptr) load_contig<A, N>(p.bias, p.bias_dtype, c0, bias);
    else {
#pragma unroll
      for (int i = 0; i < N; ++i) bias[i] = A(0);
    }
    return;
  }
  // Scalar loads: one per tap and channel (any strides).
  load_rows<A, N, W>(p.weight, p.weight_dtype, p.weight_stride_c, p.weight_stride_k, c0, w);
  A b[N][1];
  if (p.bias != nullptr) {
    load_rows<A, N, 1>(p.bias, p.bias_dtype, p.bias_stride, 0, c0, b);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) b[i][0] = A(0);
  }
#pragma unroll
  for (int i = 0; i < N; ++i) bias[i] = b[i][0];
}

// ===================================================================== forward, token-major vectorised
// Block (32, 4): 32 x kCh channels x 4 x kTok tokens. Grid (ceil(dim / (32 kCh)), ceil(L / (4 kTok)), b).
template <typename T, int W, int kTok, bool kSeq, bool kVecW>
__device__ __forceinline__ void fwd_tokmajor_body(const ConvParams& p) {
  using A = acc_t<T>;
  constexpr int kCh = 16 / sizeof(T);
  constexpr int H = W - 1;
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * kCh;
  const int t0 = (blockIdx.y * blockDim.y + threadIdx.y) * kTok;
  const int b = blockIdx.z;
  if (c0 >= p.dim || t0 >= p.seqlen) return;
  const int L = p.seqlen;
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + c0;

  A w[kCh][W], bias[kCh];
  load_weights<A, kCh, W, kVecW>(p, c0, w, bias);
  // All loads first: kTok + H vectors in flight per thread.
  Pack<T, kCh> raw[kTok + H];
#pragma unroll
  for (int i = 0; i < kTok + H; ++i) {
    const int t = t0 - H + i;
    if (t >= 0 && t < L) raw[i].load(x + t * p.x_stride_l);
    else raw[i].zero();
  }

  // Window of positions t-H .. t (slot H = current token), with their document ids.
  A xw[W][kCh];
  int sw[W];
#pragma unroll
  for (int j = 0; j < H; ++j) {
    const int t = t0 - H + j;
    sw[j] = seq_of<kSeq>(p, b, t);
#pragma unroll
    for (int i = 0; i < kCh; ++i) {
      if (t >= 0) xw[j][i] = raw[j].template get<A>(i);
      else if (p.init != nullptr)
        xw[j][i] = to_acc<A>(static_cast<const T*>(p.init)[b * p.init_stride_b + (c0 + i) * p.init_stride_c + (H + t) * p.init_stride_k]);
      else xw[j][i] = A(0);
    }
  }
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + c0;
#pragma unroll
  for (int s = 0; s < kTok; ++s) {
    const int t = t0 + s;
    if (t >= L) break;
    sw[H] = seq_of<kSeq>(p, b, t);
#pragma unroll
    for (int i = 0; i < kCh; ++i) xw[H][i] = raw[H + s].template get<A>(i);
    A y[kCh];
#pragma unroll
    for (int i = 0; i < kCh; ++i) y[i] = activate(conv_pre_window<kSeq>(w[i], bias[i], xw, sw, i), p.silu);
    store_pack<T, kCh>(out + t * p.out_stride_l, y);
#pragma unroll
    for (int j = 0; j < H; ++j) {
      sw[j] = sw[j + 1];
#pragma unroll
      for (int i = 0; i < kCh; ++i) xw[j][i] = xw[j + 1][i];
    }
  }
  // The thread whose tile holds token L-1 writes the final state: its window is now positions L-H..L-1.
  if (p.final_out != nullptr && t0 + kTok >= L) {
    T* fin = static_cast<T*>(p.final_out);
#pragma unroll
    for (int i = 0; i < kCh; ++i)
#pragma unroll
      for (int j = 0; j < H; ++j)
        fin[(int64_t(b) * p.dim + c0 + i) * H + j] = from_acc<T>(same_doc<kSeq>(sw[j], sw[H - 1]) ? xw[j][i] : A(0));
  }
}

// (128, 4): at most 128 registers, so 4 blocks (16 warps) fit per SM to overlap one tile's loads with
// another's math.
template <typename T, int W, int kTok, bool kVecW>
__global__ void __launch_bounds__(128, 4) fwd_tokmajor_kernel(ConvParams p) {
  if (p.seq_idx != nullptr) fwd_tokmajor_body<T, W, kTok, true, kVecW>(p);
  else fwd_tokmajor_body<T, W, kTok, false, kVecW>(p);
}

// ======================================================================== forward, generic strided
// One output element per thread; consecutive threads walk the unit-stride axis (tokens when tok_fast).
template <typename T, int W>
__global__ void __launch_bounds__(256) fwd_generic_kernel(ConvParams p) {
  using A = acc_t<T>;
  constexpr int H = W - 1;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = int64_t(p.batch) * p.dim * p.seqlen;
  if (idx >= total) return;
  int b, c, t;
  if (p.tok_fast) {
    t = int(idx % p.seqlen);
    c = int((idx / p.seqlen) % p.dim);
    b = int(idx / (int64_t(p.seqlen) * p.dim));
  } else {
    c = int(idx % p.dim);
    t = int((idx / p.dim) % p.seqlen);
    b = int(idx / (int64_t(p.seqlen) * p.dim));
  }
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + c * p.x_stride_c;
  const T* init = static_cast<const T*>(p.init);
  A xw[W];
  int sw[W];
#pragma unroll
  for (int k = 0; k < W; ++k) {
    const int pos = t - H + k;
    sw[k] = seq_at(p, b, pos);
    if (pos >= 0) xw[k] = to_acc<A>(x[pos * p.x_stride_l]);
    else if (init != nullptr) xw[k] = to_acc<A>(init[b * p.init_stride_b + c * p.init_stride_c + (H + pos) * p.init_stride_k]);
    else xw[k] = A(0);
  }
  A w[1][W], bias[1];
  load_weights<A, 1, W>(p, c, w, bias);
  A acc = bias[0];
#pragma unroll
  for (int k = 0; k < W; ++k) acc += w[0][k] * (sw[k] == sw[H] ? xw[k] : A(0));
  static_cast<T*>(p.out)[b * p.out_stride_b + c * p.out_stride_c + t * p.out_stride_l] = from_acc<T>(activate(acc, p.silu));
  if (p.final_out != nullptr && t == p.seqlen - 1) {
    T* fin = static_cast<T*>(p.final_out);
#pragma unroll
    for (int j = 0; j < H; ++j)
      fin[(int64_t(b) * p.dim + c) * H + j] = from_acc<T>(sw[j + 1] == sw[H] ? xw[j + 1] : A(0));
  }
}

// ====================================================================== backward, token-major vectorised
// Block (32, 4): 32 x kCh channels; the 4 token lanes take kTok-token tiles of the block's split in turn.
// Grid (ceil(dim / (32 kCh)), nsplit, batch). Each thread keeps, over positions p-H .. p: x, dpre and
// document ids.
template <typename T> struct BwdCh { static constexpr int value = sizeof(T) == 8 ? 2 : 4; };

template <typename T, int W, int kTok, bool kSeq, bool kVecW>
__device__ __forceinline__ void bwd_tokmajor_body(const ConvParams& p, acc_t<T> (&dw)[BwdCh<T>::value][W],
                                                  acc_t<T> (&db)[BwdCh<T>::value]) {
  using A = acc_t<T>;
  constexpr int kCh = BwdCh<T>::value;
  constexpr int H = W - 1;
  constexpr int kLanes = 4;
  const int c0 = (blockIdx.x * 32 + threadIdx.x) * kCh;
  const int split = blockIdx.y;
  const int b = blockIdx.z;
  const int L = p.seqlen;
  const bool active = c0 < p.dim;
  const int ts = split * p.split_len;
  const int te = min(ts + p.split_len, L);

#pragma unroll
  for (int i = 0; i < kCh; ++i) {
    db[i] = A(0);
#pragma unroll
    for (int k = 0; k < W; ++k) dw[i][k] = A(0);
  }
  if (active) {
    A w[kCh][W], bias[kCh];
    load_weights<A, kCh, W, kVecW>(p, c0, w, bias);
    const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + c0;
    const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride_b + c0;
    T* dx = static_cast<T*>(p.out) + b * p.out_stride_b + c0;
    const T* init = static_cast<const T*>(p.init);
    const T* dfinal = static_cast<const T*>(p.dfinal);
    const int seq_last = seq_of<kSeq>(p, b, L - 1);

    for (int t0 = ts + threadIdx.y * kTok; t0 < te; t0 += kLanes * kTok) {
      const int t1 = min(t0 + kTok, te);
      constexpr int kSpan = kTok + 2 * H;  // positions t0-H .. t0+kTok+H-1
      Pack<T, kCh> xr[kSpan], gr[kTok + H];
#pragma unroll
      for (int j = 0; j < kSpan; ++j) {
        const int pos = t0 - H + j;
        if (pos >= 0 && pos < L) xr[j].load(x + pos * p.x_stride_l);
        else xr[j].zero();
      }
#pragma unroll
      for (int j = 0; j < kTok + H; ++j) {
        const int pos = t0 + j;
        if (pos < L) gr[j].load(dout + pos * p.dout_stride_l);
        else gr[j].zero();
      }
      A xw[W][kCh], gw[W][kCh];
      int sw[W];
#pragma unroll
      for (int j = 0; j < W; ++j) {
        sw[j] = 0;
#pragma unroll
        for (int i = 0; i < kCh; ++i) xw[j][i] = gw[j][i] = A(0);
      }
#pragma unroll
      for (int j = 0; j < kSpan; ++j) {
        const int pos = t0 - H + j;
        // Shift the window and bring in position pos.
#pragma unroll
        for (int q = 0; q < H; ++q) {
          sw[q] = sw[q + 1];
#pragma unroll
          for (int i = 0; i < kCh; ++i) { xw[q][i] = xw[q + 1][i]; gw[q][i] = gw[q + 1][i]; }
        }
        sw[H] = pos < L ? seq_of<kSeq>(p, b, pos) : seq_last;
#pragma unroll
        for (int i = 0; i < kCh; ++i) {
          if (pos >= 0) xw[H][i] = xr[j].template get<A>(i);
          else if (init != nullptr)
            xw[H][i] = to_acc<A>(init[b * p.init_stride_b + (c0 + i) * p.init_stride_c + (H + pos) * p.init_stride_k]);
          else xw[H][i] = A(0);
          gw[H][i] = A(0);
        }
        if (pos >= t0 && pos < L) {
          // dpre at pos; accumulate dweight/dbias for the tile's own tokens only.
#pragma unroll
          for (int i = 0; i < kCh; ++i) {
            const A pre = conv_pre_window<kSeq>(w[i], bias[i], xw, sw, i);
            const A g = gr[j - H].template get<A>(i) * activate_grad(pre, p.silu);
            gw[H][i] = g;
            if (pos < t1) {
              db[i] += g;
#pragma unroll
              for (int k = 0; k < W; ++k) dw[i][k] += g * (same_doc<kSeq>(sw[k], sw[H]) ? xw[k][i] : A(0));
            }
          }
        }
        // dx at s = pos - H, which needs dpre at s .. s+H (all in the window now).
        const int s = pos - H;
        const bool emit_dx = s >= t0 && s < t1;
        const bool emit_dinit = t0 == 0 && init != nullptr && p.dinit != nullptr && s < 0 && s >= -H;
        if (emit_dx || emit_dinit) {
          A g[kCh];
#pragma unroll
          for (int i = 0; i < kCh; ++i) {
            A acc = A(0);
#pragma unroll
            for (int k = 0; k < W; ++k) acc += w[i][k] * (same_doc<kSeq>(sw[0], sw[H - k]) ? gw[H - k][i] : A(0));
            if (dfinal != nullptr && s >= L - H && same_doc<kSeq>(sw[0], seq_last))
              acc += to_acc<A>(dfinal[b * p.dfinal_stride_b + (c0 + i) * p.dfinal_stride_c + (s - (L - H)) * p.dfinal_stride_k]);
            g[i] = acc;
          }
          if (emit_dx) {
            store_pack<T, kCh>(dx + s * p.out_stride_l, g);
          } else {
            T* dinit = static_cast<T*>(p.dinit);
#pragma unroll
            for (int i = 0; i < kCh; ++i) dinit[(int64_t(b) * p.dim + c0 + i) * H + H + s] = from_acc<T>(g[i]);
          }
        }
      }
    }
  }
}

// 3 blocks per SM for 16-bit types (a ~130-byte spill for W = 4, in exchange for 12 warps per SM);
// 2 for fp32/fp64, whose wider accumulators would spill more.
// Dweight reduction of the stream and async backwards: the block's 4 token runs summed in run order (fixed:
// deterministic), then one partial row per (batch, block row) in the workspace.
template <typename T, int W>
__device__ __forceinline__ void bwd_block_partials(const ConvParams& p, acc_t<T> (&dw)[BwdCh<T>::value][W],
                                                   acc_t<T> (&db)[BwdCh<T>::value],
                                                   acc_t<T> (*red)[32 * BwdCh<T>::value][W + 1]) {
  using A = acc_t<T>;
  constexpr int kCh = BwdCh<T>::value;
  constexpr int kLanes = 4;
  const int c0 = (blockIdx.x * 32 + threadIdx.x) * kCh;
#pragma unroll
  for (int i = 0; i < kCh; ++i) {
#pragma unroll
    for (int k = 0; k < W; ++k) red[threadIdx.y][threadIdx.x * kCh + i][k] = dw[i][k];
    red[threadIdx.y][threadIdx.x * kCh + i][W] = db[i];
  }
  __syncthreads();
  if (threadIdx.y == 0 && c0 < p.dim) {
    float* ws = p.workspace + (int64_t(blockIdx.z) * p.nsplit + blockIdx.y) * p.dim * (W + 1);
#pragma unroll
    for (int i = 0; i < kCh; ++i) {
#pragma unroll
      for (int k = 0; k <= W; ++k) {
        A sum = A(0);
#pragma unroll
        for (int l = 0; l < kLanes; ++l) sum += red[l][threadIdx.x * kCh + i][k];
        ws[int64_t(c0 + i) * (W + 1) + k] = static_cast<float>(sum);
      }
    }
  }
}

template <typename T, int W, int kTok, bool kVecW>
__global__ void __launch_bounds__(128, sizeof(T) == 2 ? 3 : 2) bwd_tokmajor_kernel(ConvParams p) {
  using A = acc_t<T>;
  constexpr int kCh = BwdCh<T>::value;
  constexpr int kLanes = 4;
  A dw[kCh][W], db[kCh];
  if (p.seq_idx != nullptr) bwd_tokmajor_body<T, W, kTok, true, kVecW>(p, dw, db);
  else bwd_tokmajor_body<T, W, kTok, false, kVecW>(p, dw, db);
  // Block reduction over the token lanes, in lane order, then one partial per (batch, split). (Once per block:
  // the shared helper's few extra instructions against a private copy do not matter.)
  __shared__ A red[kLanes][32 * kCh][W + 1];
  bwd_block_partials<T, W>(p, dw, db, red);
}

// ========================================================================= backward, generic strided
// Scalar helpers for one (b, c); positions are tokens, negative ones the initial state.
template <typename T, int W>
struct GenericRow {
  using A = acc_t<T>;
  static constexpr int H = W - 1;
  const ConvParams& p;
  int b, c;
  A w[1][W], bias[1];
  __device__ GenericRow(const ConvParams& params, int b_, int c_) : p(params), b(b_), c(c_) {
    load_weights<A, 1, W>(p, c, w, bias);
  }
  __device__ A x_at(int pos) const {
    if (pos >= 0) return to_acc<A>(static_cast<const T*>(p.x)[b * p.x_stride_b + c * p.x_stride_c + pos * p.x_stride_l]);
    if (p.init == nullptr) return A(0);
    return to_acc<A>(static_cast<const T*>(p.init)[b * p.init_stride_b + c * p.init_stride_c + (H + pos) * p.init_stride_k]);
  }
  // x tap k of output t, zero across a document boundary.
  __device__ A tap(int t, int k) const {
    const int pos = t - H + k;
    return seq_at(p, b, pos) == seq_at(p, b, t) ? x_at(pos) : A(0);
  }
  __device__ A dpre_at(int t) const {
    if (t < 0 || t >= p.seqlen) return A(0);
    A pre = bias[0];
#pragma unroll
    for (int k = 0; k < W; ++k) pre += w[0][k] * tap(t, k);
    const A g = to_acc<A>(static_cast<const T*>(p.dout)[b * p.dout_stride_b + c * p.dout_stride_c + t * p.dout_stride_l]);
    return g * activate_grad(pre, p.silu);
  }
  // Gradient w.r.t. the input at position s (>= -H).
  __device__ A dinput_at(int s) const {
    const int L = p.seqlen;
    const int seq_s = seq_at(p, b, s);
    A acc = A(0);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const int t = s + H - k;
      if (t >= 0 && t < L && seq_at(p, b, t) == seq_s) acc += w[0][k] * dpre_at(t);
    }
    if (p.dfinal != nullptr && s >= L - H && seq_s == seq_at(p, b, L - 1))
      acc += to_acc<A>(static_cast<const T*>(p.dfinal)[b * p.dfinal_stride_b + c * p.dfinal_stride_c + (s - (L - H)) * p.dfinal_stride_k]);
    return acc;
  }
};

// Block (32, 8). tok_fast: 8 channels x 32 token lanes; else 32 channels x 8 token lanes.
// Grid (ceil(dim / channels per block), nsplit, batch).
template <typename T, int W>
__global__ void __launch_bounds__(256) bwd_generic_kernel(ConvParams p) {
  using A = acc_t<T>;
  constexpr int H = W - 1;
  const int split = blockIdx.y;
  const int b = blockIdx.z;
  int c, lane, lanes;
  if (p.tok_fast) { c = blockIdx.x * 8 + threadIdx.y; lane = threadIdx.x; lanes = 32; }
  else { c = blockIdx.x * 32 + threadIdx.x; lane = threadIdx.y; lanes = 8; }
  const bool active = c < p.dim;
  A acc[W + 1];
#pragma unroll
  for (int k = 0; k <= W; ++k) acc[k] = A(0);
  if (active) {
    GenericRow<T, W> row(p, b, c);
    const int ts = split * p.split_len;
    const int te = min(ts + p.split_len, p.seqlen);
    T* dx = static_cast<T*>(p.out) + b * p.out_stride_b + c * p.out_stride_c;
    for (int t = ts + lane; t < te; t += lanes) {
      dx[t * p.out_stride_l] = from_acc<T>(row.dinput_at(t));
      const A g = row.dpre_at(t);
#pragma unroll
      for (int k = 0; k < W; ++k) acc[k] += g * row.tap(t, k);
      acc[W] += g;
      if (t == 0 && p.init != nullptr && p.dinit != nullptr) {
        T* dinit = static_cast<T*>(p.dinit);
        for (int s = -H; s < 0; ++s) dinit[(int64_t(b) * p.dim + c) * H + H + s] = from_acc<T>(row.dinput_at(s));
      }
    }
  }
  __shared__ A red[8][32][W + 1];
#pragma unroll
  for (int k = 0; k <= W; ++k) red[threadIdx.y][threadIdx.x][k] = acc[k];
  __syncthreads();
  if (lane == 0 && active) {
    float* ws = p.workspace + (int64_t(b) * p.nsplit + split) * p.dim * (W + 1);
#pragma unroll
    for (int k = 0; k <= W; ++k) {
      A sum = A(0);
      for (int l = 0; l < lanes; ++l) sum += p.tok_fast ? red[threadIdx.y][l][k] : red[l][threadIdx.x][k];
      ws[int64_t(c) * (W + 1) + k] = static_cast<float>(sum);
    }
  }
}

// Sum the (batch * nsplit) partials of each (channel, tap) column in row order.
static __global__ void __launch_bounds__(256) reduce_dweight_kernel(const float* ws, int rows, int dim, int width,
                                                                    float* dweight, float* dbias) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  const int cols = dim * (width + 1);
  if (col >= cols) return;
  float sum = 0.f;
  for (int r = 0; r < rows; ++r) sum += ws[int64_t(r) * cols + col];
  const int c = col / (width + 1), k = col % (width + 1);
  if (k < width) dweight[c * width + k] = sum;
  else if (dbias != nullptr) dbias[c] = sum;
}

// ================================================================================= update (decode)
template <typename T>
__global__ void __launch_bounds__(128) update_kernel(UpdateParams p) {
  using A = acc_t<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(p.batch) * p.dim) return;
  const int c = int(idx % p.dim);
  const int b = int(idx / p.dim);
  const int q = p.seqlen, W = p.width, H = W - 1, S = p.state_len;
  T* out = static_cast<T*>(p.out) + (int64_t(b) * p.dim + c) * q;
  const int slot = p.slot_idx == nullptr ? b : p.slot_idx[b * p.slot_stride];
  // Padding row (-1): zero output, no state I/O. An out-of-range slot is treated the same way rather than
  // corrupting memory (the Python layer rejects it before the call).
  if (slot < 0 || slot >= p.slots) {
    for (int t = 0; t < q; ++t) out[t] = from_acc<T>(A(0));
    return;
  }
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + c * p.x_stride_c;
  const int64_t srow = slot * p.state_stride_b + c * p.state_stride_c;
  A w[4], win[4];
  for (int k = 0; k < W; ++k) w[k] = load_any<A>(p.weight, c * p.weight_stride_c + k * p.weight_stride_k, p.weight_dtype);
  const A bias = p.bias == nullptr ? A(0) : load_any<A>(p.bias, c * p.bias_stride, p.bias_dtype);
  // The reference moves the cached window into the activation dtype before using it.
  for (int j = 0; j < H; ++j)
    win[j] = round_to<T>(load_any<A>(p.conv_state, srow + (S - H + j) * p.state_stride_k, p.state_dtype));
  for (int t = 0; t < q; ++t) {
    win[H] = to_acc<A>(x[t * p.x_stride_l]);
    A acc = bias;
    for (int k = 0; k < W; ++k) acc += w[k] * win[k];
    out[t] = from_acc<T>(activate(acc, p.silu));
    for (int j = 0; j < H; ++j) win[j] = win[j + 1];
  }
  // New state = (old state ++ x)[q : q + S]; ascending order reads each element before overwriting it.
  for (int i = 0; i < S; ++i) {
    const int src = i + q;
    const A v = src < S ? round_to<T>(load_any<A>(p.conv_state, srow + src * p.state_stride_k, p.state_dtype))
                        : to_acc<A>(x[(src - S) * p.x_stride_l]);
    store_any<A>(p.conv_state, srow + i * p.state_stride_k, p.state_dtype, v);
  }
}

// ================================================================= streaming variants (v2, vectorised)
// APRIEL_CONV1D_FWD_IMPL=stream / APRIEL_CONV1D_BWD_IMPL=stream. Why they exist (the tile kernels above,
// H100 b1 L8192 C4096 bf16): the tile forward re-reads a 3-token halo per 8-token tile (1.375x the x
// requests) and reloads the weights in every 32-token block (4096 blocks x 128 threads x 96 B = 50 MB of
// L2 traffic next to 67 MB of x), and its 4096 blocks make ~5.2 waves of resident blocks (a ragged tail
// wave); the tile backward re-reads 2 halos per 8-token tile (1.75x x, 1.375x dout) with 8-byte loads
// and waits on each tile's loads before its math (no prefetch).
// Here a thread owns kCh channels x a contiguous run of split_len tokens: the window of the last W-1
// inputs (and, backward, W dpre values) stays in registers from one token to the next, the weights are
// read once per thread, chunk c+1 (kStreamChunk tokens) is loaded while chunk c is computed, reads skip
// L1 (ld.global.nc.L1::no_allocate: nothing is re-read by the same SM) and writes are streaming (st.cs).
// The grid is one wave: the launcher asks the occupancy API how many blocks fit per SM.
constexpr int kStreamChunk = 8;

// Read-only streaming loads, 8 or 16 bytes; no L1 allocation.
__device__ __forceinline__ uint4 ld_stream(const uint4* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
  return v;
}
// A run's halo rows are the previous run's last rows, which another block reads near the END of the kernel:
// by then a plain line would have been evicted (the whole input streams through L2), so each halo row would
// come from DRAM twice (3 of every 64 rows at b1 L8192 4096 ch: ~2.3 % of the traffic). Loaded with an L2
// evict_last policy, the ~3 MB of halo lines stay in L2 until their second read.
__device__ __forceinline__ uint4 ld_halo(const uint4* ptr) {
  uint4 v;
  asm("{\n\t.reg .b64 pol;\n\t"
      "createpolicy.fractional.L2::evict_last.b64 pol, 1.0;\n\t"
      "ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], pol;\n\t}"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
  return v;
}
__device__ __forceinline__ uint2 ld_stream(const uint2* ptr) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(ptr));
  return v;
}

template <typename T, int N>
__device__ __forceinline__ void load_stream(Pack<T, N>& pk, const T* ptr) {
  pk.v = ld_stream(reinterpret_cast<const typename Pack<T, N>::V*>(ptr));
}

template <typename T, int N, typename A>
__device__ __forceinline__ void store_stream(T* ptr, const A (&vals)[N]) {
  Pack<T, N> pk;
  T* e = reinterpret_cast<T*>(&pk.v);
#pragma unroll
  for (int i = 0; i < N; ++i) e[i] = from_acc<T>(vals[i]);
  __stcs(reinterpret_cast<typename Pack<T, N>::V*>(ptr), pk.v);
}

// Weights of one thread's channels: vector loads when the host found weight/bias contiguous and aligned
// (one uniform branch per thread, not a second kernel instantiation).
template <typename A, int N, int W>
__device__ __forceinline__ void load_weights_any(const ConvParams& p, int c0, A (&w)[N][W], A (&bias)[N]) {
  if (p.weight_vec) load_weights<A, N, W, true>(p, c0, w, bias);
  else load_weights<A, N, W, false>(p, c0, w, bias);
}

// The window rows before a run starting at ts (rows 0 .. H-1 = positions ts-H .. ts-1) and their documents:
// x from the run's channel pointer, before position 0 the initial state init (p.init; 0 when null). kEvictLast:
// 16-byte rows through ld_halo (L2 evict_last, the async forward; see there). init is a parameter, not re-read
// from p: with p.init the fp64 W2 fused backward took 8 more instructions.
template <typename T, int W, bool kSeq, bool kEvictLast, int R, int kCh, typename A>
__device__ __forceinline__ void load_halo(const ConvParams& p, const T* x, const T* init, int ts, int b, int c0,
                                          A (&xw)[R][kCh], int (&sw)[R]) {
  constexpr int H = W - 1;
  static_assert(R >= H, "the window holds the halo");
#pragma unroll
  for (int j = 0; j < H; ++j) {
    const int t = ts - H + j;
    sw[j] = seq_of<kSeq>(p, b, t);
    if (t >= 0) {
      Pack<T, kCh> h;
      if constexpr (kEvictLast && sizeof(typename Pack<T, kCh>::V) == 16) {
        h.v = ld_halo(reinterpret_cast<const uint4*>(x + t * p.x_stride_l));
      } else {
        load_stream(h, x + t * p.x_stride_l);
      }
#pragma unroll
      for (int i = 0; i < kCh; ++i) xw[j][i] = h.template get<A>(i);
    } else {
#pragma unroll
      for (int i = 0; i < kCh; ++i)
        xw[j][i] = init == nullptr ? A(0)
                   : to_acc<A>(init[b * p.init_stride_b + (c0 + i) * p.init_stride_c + (H + t) * p.init_stride_k]);
    }
  }
}

// Block (32, 4): 32 x kCh channels x 4 token runs. Grid (ceil(dim / (32 kCh)), ceil(runs / 4), batch).
template <typename T, int W, bool kSeq>
__device__ __forceinline__ void fwd_stream_body(const ConvParams& p) {
  using A = acc_t<T>;
  constexpr int kCh = 16 / sizeof(T);
  constexpr int H = W - 1;
  constexpr int K = kStreamChunk;
  const int c0 = (blockIdx.x * 32 + threadIdx.x) * kCh;
  const int ts = (blockIdx.y * blockDim.y + threadIdx.y) * p.split_len;
  const int b = blockIdx.z;
  const int L = p.seqlen;
  if (c0 >= p.dim || ts >= L) return;
  const int te = min(ts + p.split_len, L);
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + c0;
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + c0;

  Pack<T, kCh> cur[K], nxt[K];
  // First chunk and the halo before the run, issued before the weights are needed.
#pragma unroll
  for (int s = 0; s < K; ++s) {
    if (ts + s < te) load_stream(cur[s], x + (ts + s) * p.x_stride_l);
    else cur[s].zero();
  }
  A xw[W][kCh];
  int sw[W];
  load_halo<T, W, kSeq, false>(p, x, static_cast<const T*>(p.init), ts, b, c0, xw, sw);
  A w[kCh][W], bias[kCh];
  load_weights_any<A, kCh, W>(p, c0, w, bias);

#pragma unroll 1
  for (int t0 = ts; t0 < te; t0 += K) {
    // Prefetch chunk t0 + K while this one is computed.
#pragma unroll
    for (int s = 0; s < K; ++s) {
      const int t = t0 + K + s;
      if (t < te) load_stream(nxt[s], x + t * p.x_stride_l);
    }
#pragma unroll
    for (int s = 0; s < K; ++s) {
      const int t = t0 + s;
      if (t >= te) break;
      sw[H] = seq_of<kSeq>(p, b, t);
#pragma unroll
      for (int i = 0; i < kCh; ++i) xw[H][i] = cur[s].template get<A>(i);
      A y[kCh];
#pragma unroll
      for (int i = 0; i < kCh; ++i) y[i] = activate(conv_pre_window<kSeq>(w[i], bias[i], xw, sw, i), p.silu);
      store_stream<T, kCh>(out + t * p.out_stride_l, y);
#pragma unroll
      for (int j = 0; j < H; ++j) {
        sw[j] = sw[j + 1];
#pragma unroll
        for (int i = 0; i < kCh; ++i) xw[j][i] = xw[j + 1][i];
      }
    }
#pragma unroll
    for (int s = 0; s < K; ++s) cur[s] = nxt[s];
  }
  // The run holding token L-1 writes the final state: its window is now positions L-H .. L-1.
  if (p.final_out != nullptr && te == L) {
    T* fin = static_cast<T*>(p.final_out);
#pragma unroll
    for (int i = 0; i < kCh; ++i)
#pragma unroll
      for (int j = 0; j < H; ++j)
        fin[(int64_t(b) * p.dim + c0 + i) * H + j] = from_acc<T>(same_doc<kSeq>(sw[j], sw[H - 1]) ? xw[j][i] : A(0));
  }
}

// (128, 3): up to 168 registers (two chunk buffers + fp32 window + weights), 12 warps per SM.
#ifndef APRIEL_CONV1D_FWD_STREAM_MIN_BLOCKS
#define APRIEL_CONV1D_FWD_STREAM_MIN_BLOCKS 3
#endif
template <typename T, int W>
__global__ void __launch_bounds__(128, APRIEL_CONV1D_FWD_STREAM_MIN_BLOCKS) fwd_stream_kernel(ConvParams p) {
  if (p.seq_idx != nullptr) fwd_stream_body<T, W, true>(p);
  else fwd_stream_body<T, W, false>(p);
}

// ===================================================================== forward, channel-major vectorised
// x and out (batch, dim, seqlen) with unit token stride (mamba-ssm's layout), 16-byte aligned rows,
// seqlen % kV == 0 (host check, ConvParams::chan_vec). Why: the generic kernel above reads W scalars, the
// document ids and W+1 weights per output element: 11% of the copy rate on the H100 (0.388 ms at
// b1 L8192 C4096 bf16). Here a thread loads kCmVecs 16-byte vectors of kV = 16/sizeof(T) consecutive
// tokens of one channel (all loads issued before any math), and takes the W-1 halo tokens in front of each
// vector from its neighbour's vector through shared memory - the one at the block's start loads the
// vector in front of it. Block 128 threads = kCmVecs x 128 vectors of one (batch, channel) row;
// grid (batch * dim, ceil(seqlen / tile)). Only for kV >= W-1 (2- and 4-byte types): the halo then lies
// in one neighbouring vector.
constexpr int kCmVecs = kCmTileVecs / 128;

template <typename T, int W, bool kSeq>
__device__ __forceinline__ void fwd_chanmajor_body(const ConvParams& p, uint4 (&sv)[kCmVecs * 128]) {
  using A = acc_t<T>;
  constexpr int kV = 16 / sizeof(T);
  constexpr int H = W - 1;
  static_assert(kV >= H, "the halo must fit in one neighbouring vector");
  const int L = p.seqlen;
  const int row = blockIdx.x;
  const int b = row / p.dim, c = row % p.dim;
  const int tid = threadIdx.x;
  const int v0 = blockIdx.y * kCmVecs * 128;  // first vector of the block's tile
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + int64_t(c) * p.x_stride_c;
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + int64_t(c) * p.out_stride_c;

  Pack<T, kV> cur[kCmVecs], before;
#pragma unroll
  for (int j = 0; j < kCmVecs; ++j) {
    const int t0 = (v0 + j * 128 + tid) * kV;
    if (t0 < L) load_stream(cur[j], x + t0);
    else cur[j].zero();
  }
  if (tid == 0 && v0 > 0) load_stream(before, x + (v0 - 1) * kV);
  A w[1][W], bias[1];
  load_weights_any<A, 1, W>(p, c, w, bias);
#pragma unroll
  for (int j = 0; j < kCmVecs; ++j) sv[j * 128 + tid] = cur[j].v;
  __syncthreads();

#pragma unroll
  for (int j = 0; j < kCmVecs; ++j) {
    const int i = j * 128 + tid;  // vector index within the tile
    const int t0 = (v0 + i) * kV;
    if (t0 >= L) break;  // later vectors of this thread lie further right
    // xs[k] = x at position t0 - H + k, k < H + kV; sq[k] its document.
    A xs[H + kV];
    int sq[H + kV];
    if (i > 0 || v0 > 0) {
      Pack<T, kV> prev;
      prev.v = i > 0 ? sv[i - 1] : before.v;
#pragma unroll
      for (int h = 0; h < H; ++h) xs[h] = prev.template get<A>(kV - H + h);
    } else {  // t0 == 0: the initial state (or zeros) precedes token 0
#pragma unroll
      for (int h = 0; h < H; ++h)
        xs[h] = p.init == nullptr ? A(0)
                : to_acc<A>(static_cast<const T*>(p.init)[b * p.init_stride_b + int64_t(c) * p.init_stride_c +
                                                          h * p.init_stride_k]);
    }
#pragma unroll
    for (int e = 0; e < kV; ++e) xs[H + e] = cur[j].template get<A>(e);
#pragma unroll
    for (int k = 0; k < H + kV; ++k) sq[k] = seq_of<kSeq>(p, b, t0 - H + k);
    A y[kV];
#pragma unroll
    for (int e = 0; e < kV; ++e) {
      A acc = bias[0];
#pragma unroll
      for (int k = 0; k < W; ++k) acc += w[0][k] * (same_doc<kSeq>(sq[e + k], sq[e + H]) ? xs[e + k] : A(0));
      y[e] = activate(acc, p.silu);
    }
    store_stream<T, kV>(out + t0, y);
    // The vector ending at token L-1 writes the final state: positions L-H .. L-1 = xs[kV .. kV+H-1].
    if (p.final_out != nullptr && t0 + kV == L) {
      T* fin = static_cast<T*>(p.final_out);
#pragma unroll
      for (int h = 0; h < H; ++h)
        fin[(int64_t(b) * p.dim + c) * H + h] = from_acc<T>(same_doc<kSeq>(sq[kV + h], sq[H + kV - 1]) ? xs[kV + h] : A(0));
    }
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(128) fwd_chanmajor_kernel(ConvParams p) {
  __shared__ uint4 sv[kCmVecs * 128];
  if (p.seq_idx != nullptr) fwd_chanmajor_body<T, W, true>(p, sv);
  else fwd_chanmajor_body<T, W, false>(p, sv);
}

// Backward of the same layout (APRIEL_CONV1D_CM_IMPL=vec, same conditions on x, dout and dx): the same
// tiling; a thread needs x at t0-H .. t0+kV+H-1 (left halo from the left neighbour's vector, right halo
// from the right neighbour's: pre-activations at the H positions after its vector feed its dx) and dout at
// t0 .. t0+kV+H-1. dweight/dbias: per thread over its own tokens, then a fixed-order block reduction (the
// block is one channel) into one partial row per (batch, token tile); reduce_dweight_kernel sums them.
template <typename T, int W, bool kSeq>
__device__ __forceinline__ void bwd_chanmajor_body(const ConvParams& p, uint4 (&sx)[kCmVecs * 128],
                                                   uint4 (&sg)[kCmVecs * 128], float (&red)[4][W + 1]) {
  using A = acc_t<T>;
  constexpr int kV = 16 / sizeof(T);
  constexpr int H = W - 1;
  constexpr int M = 2 * H + kV;  // x positions t0-H .. t0+kV+H-1
  constexpr int N = kV + H;      // dpre positions t0 .. t0+kV+H-1
  static_assert(kV >= H, "the halos must fit in one neighbouring vector");
  const int L = p.seqlen;
  const int row = blockIdx.x;
  const int b = row / p.dim, c = row % p.dim;
  const int tid = threadIdx.x;
  const int v0 = blockIdx.y * kCmVecs * 128;
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + int64_t(c) * p.x_stride_c;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride_b + int64_t(c) * p.dout_stride_c;
  T* dx = static_cast<T*>(p.out) + b * p.out_stride_b + int64_t(c) * p.out_stride_c;

  Pack<T, kV> cx[kCmVecs], cg[kCmVecs], before, after_x, after_g;
#pragma unroll
  for (int j = 0; j < kCmVecs; ++j) {
    const int t0 = (v0 + j * 128 + tid) * kV;
    if (t0 < L) { load_stream(cx[j], x + t0); load_stream(cg[j], dout + t0); }
    else { cx[j].zero(); cg[j].zero(); }
  }
  const int v_end = v0 + kCmVecs * 128;  // first vector after the tile
  if (tid == 0 && v0 > 0) load_stream(before, x + (v0 - 1) * kV);
  if (tid == 127) {
    if (v_end * kV < L) { load_stream(after_x, x + v_end * kV); load_stream(after_g, dout + v_end * kV); }
    else { after_x.zero(); after_g.zero(); }
  }
  A w[1][W], bias[1];
  load_weights_any<A, 1, W>(p, c, w, bias);
  const int seq_last = seq_of<kSeq>(p, b, L - 1);
#pragma unroll
  for (int j = 0; j < kCmVecs; ++j) { sx[j * 128 + tid] = cx[j].v; sg[j * 128 + tid] = cg[j].v; }
  __syncthreads();

  A dw[W], db = A(0);
#pragma unroll
  for (int k = 0; k < W; ++k) dw[k] = A(0);
#pragma unroll
  for (int j = 0; j < kCmVecs; ++j) {
    const int i = j * 128 + tid;
    const int t0 = (v0 + i) * kV;
    if (t0 >= L) break;
    A xs[M], gs[N];
    int sq[M];
    if (i > 0 || v0 > 0) {
      Pack<T, kV> prev;
      prev.v = i > 0 ? sx[i - 1] : before.v;
#pragma unroll
      for (int h = 0; h < H; ++h) xs[h] = prev.template get<A>(kV - H + h);
    } else {
#pragma unroll
      for (int h = 0; h < H; ++h)
        xs[h] = p.init == nullptr ? A(0)
                : to_acc<A>(static_cast<const T*>(p.init)[b * p.init_stride_b + int64_t(c) * p.init_stride_c +
                                                          h * p.init_stride_k]);
    }
    Pack<T, kV> nx, ng;
    nx.v = i + 1 < kCmVecs * 128 ? sx[i + 1] : after_x.v;
    ng.v = i + 1 < kCmVecs * 128 ? sg[i + 1] : after_g.v;
#pragma unroll
    for (int e = 0; e < kV; ++e) { xs[H + e] = cx[j].template get<A>(e); gs[e] = cg[j].template get<A>(e); }
#pragma unroll
    for (int h = 0; h < H; ++h) { xs[H + kV + h] = nx.template get<A>(h); gs[kV + h] = ng.template get<A>(h); }
#pragma unroll
    for (int m = 0; m < M; ++m) sq[m] = seq_of<kSeq>(p, b, min(t0 - H + m, L - 1));
    // dpre at position t0 + n (0 past the end); dweight/dbias over the thread's own tokens n < kV.
    A dpre[N];
#pragma unroll
    for (int n = 0; n < N; ++n) {
      dpre[n] = A(0);
      if (n < kV || t0 + n < L) {
        A pre = bias[0];
#pragma unroll
        for (int k = 0; k < W; ++k) pre += w[0][k] * (same_doc<kSeq>(sq[n + k], sq[n + H]) ? xs[n + k] : A(0));
        dpre[n] = gs[n] * activate_grad(pre, p.silu);
        if (n < kV) {
          db += dpre[n];
#pragma unroll
          for (int k = 0; k < W; ++k) dw[k] += dpre[n] * (same_doc<kSeq>(sq[n + k], sq[n + H]) ? xs[n + k] : A(0));
        }
      }
    }
    // dx[s], s = t0 + e: taps k of outputs s + H - k = dpre[e + H - k] in the same document as s.
    A g[kV];
#pragma unroll
    for (int e = 0; e < kV; ++e) {
      A acc = A(0);
#pragma unroll
      for (int k = 0; k < W; ++k) acc += w[0][k] * (same_doc<kSeq>(sq[e + H], sq[e + 2 * H - k]) ? dpre[e + H - k] : A(0));
      const int sidx = t0 + e;
      if (p.dfinal != nullptr && sidx >= L - H && same_doc<kSeq>(sq[e + H], seq_last))
        acc += to_acc<A>(static_cast<const T*>(p.dfinal)[b * p.dfinal_stride_b + int64_t(c) * p.dfinal_stride_c +
                                                          (sidx - (L - H)) * p.dfinal_stride_k]);
      g[e] = acc;
    }
    store_stream<T, kV>(dx + t0, g);
    // dinit[h] (position h - H < 0, document of token 0): outputs t = h - k + ... = dpre[h - k] for k <= h.
    if (t0 == 0 && p.init != nullptr && p.dinit != nullptr) {
      T* dinit = static_cast<T*>(p.dinit);
#pragma unroll
      for (int h = 0; h < H; ++h) {
        A acc = A(0);
#pragma unroll
        for (int k = 0; k < W; ++k) {
          const int n = h - k;  // output position n = (h - H) + H - k
          if (n >= 0) acc += w[0][k] * (same_doc<kSeq>(sq[h], sq[n + H]) ? dpre[n] : A(0));
        }
        dinit[(int64_t(b) * p.dim + c) * H + h] = from_acc<T>(acc);
      }
    }
  }
  // Block reduction in a fixed order: xor butterfly within each warp, then the 4 warps in order.
#pragma unroll
  for (int k = 0; k <= W; ++k) {
    A v = k < W ? dw[k] : db;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((tid & 31) == 0) red[tid >> 5][k] = static_cast<float>(v);
  }
  __syncthreads();
  if (tid <= W) {
    const float sum = ((red[0][tid] + red[1][tid]) + red[2][tid]) + red[3][tid];
    p.workspace[(int64_t(b) * p.nsplit + blockIdx.y) * p.dim * (W + 1) + int64_t(c) * (W + 1) + tid] = sum;
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(128) bwd_chanmajor_kernel(ConvParams p) {
  __shared__ uint4 sx[kCmVecs * 128], sg[kCmVecs * 128];
  __shared__ float red[4][W + 1];
  if (p.seq_idx != nullptr) bwd_chanmajor_body<T, W, true>(p, sx, sg, red);
  else bwd_chanmajor_body<T, W, false>(p, sx, sg, red);
}

// -------------------------------------------------------------- forward, stream + cp.async (v3, "async")
// APRIEL_CONV1D_FWD_IMPL=async. The stream forward above keeps its prefetched chunk in registers: 168
// registers, 3 blocks (12 warps) and ~48 KB in flight per SM. Here the chunks go global -> shared memory
// with cp.async (no registers held while in flight, L1 bypassed): kAsyncStages slots of kAsyncChunk
// tokens per thread, kAsyncStages - 1 chunks ahead of the one being computed (192 B per thread), and the
// registers drop to window + weights. Each thread reads back only the slots it filled itself, so no block
// barrier is needed: cp.async.wait_group orders its own copies, and a slot is refilled only after the
// stores that consumed its previous contents were issued (in-order issue), so there is no WAR hazard.
constexpr int kAsyncChunk = 4;
constexpr int kAsyncStages = 4;
// "deep" variants (APRIEL_CONV1D_{FWD,BWD}_IMPL=deep|fused): 6 stages = 5 chunks ahead of the one computed,
// 48 KB of static smem per block (the static limit). Why: at 4 stages a thread is only 3 chunks of its own
// compute ahead of its loads; with 3-4 warps per scheduler that lookahead (~1.5 us in the backward) is
// about DRAM latency under full load, so late chunks stall the warp.
constexpr int kDeepStages = 6;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Slots: [stage][token][thread] so a warp's 16-byte copies and reads hit consecutive banks.
using AsyncStage = uint4[kAsyncChunk][128];

// kWide ("wide"): the block's 4 warps take 4 adjacent 512-byte channel segments of ONE token run (2 KB
// contiguous per token row, grid (ceil(dim / (128 kCh)), runs, batch)) instead of one segment of 4 runs:
// each token row is then read and written in 2 KB pieces at a time rather than 512 B scattered over 4
// runs, closer to the access pattern of a copy (which reaches 2.64 TB/s where async reaches 2.25).
template <typename T, int W, bool kSeq, int S, bool kWide>
__device__ __forceinline__ void fwd_async_body(const ConvParams& p, AsyncStage* stage) {
  using A = acc_t<T>;
  constexpr int kCh = 16 / sizeof(T);
  constexpr int H = W - 1;
  constexpr int K = kAsyncChunk;
  static_assert(K >= H, "a chunk must hold the whole halo of the next one");
  const int c0 = kWide ? ((blockIdx.x * 4 + threadIdx.y) * 32 + threadIdx.x) * kCh : (blockIdx.x * 32 + threadIdx.x) * kCh;
  const int ts = kWide ? blockIdx.y * p.split_len : (blockIdx.y * blockDim.y + threadIdx.y) * p.split_len;
  const int b = blockIdx.z;
  const int L = p.seqlen;
  if (c0 >= p.dim || ts >= L) return;  // no barriers below: an idle thread may leave
  const int te = min(ts + p.split_len, L);
  const int tid = threadIdx.y * 32 + threadIdx.x;
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + c0;
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + c0;

  // Chunk c -> slot c % S; one commit group per chunk (empty past the run's end, to keep the count).
  // Chunks are issued in order, so the source pointer and the shared address advance by constants: the
  // 64-bit row index math and the generic -> shared conversion are done once, not per token (they were
  // ~20 of the loop's ~180 instructions per token).
  const int64_t x_row = p.x_stride_l;
  const T* x_next = x + int64_t(ts) * x_row;
  const unsigned slot0 = static_cast<unsigned>(__cvta_generic_to_shared(&stage[0][0][tid]));
  constexpr unsigned kSlotBytes = sizeof(AsyncStage), kRowBytes = 128 * sizeof(uint4);
  auto issue = [&](int chunk) {
    const unsigned dst = slot0 + (chunk % S) * kSlotBytes;
    const int t = ts + chunk * K;
#pragma unroll
    for (int s = 0; s < K; ++s) {
      if (t + s < te) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + s * kRowBytes), "l"(x_next + s * x_row)
                     : "memory");
      }
    }
    x_next += K * x_row;
    cp_async_commit();
  };
#pragma unroll
  for (int c = 0; c < S - 1; ++c) issue(c);

  A xw[W][kCh];
  int sw[W];
  load_halo<T, W, kSeq, true>(p, x, static_cast<const T*>(p.init), ts, b, c0, xw, sw);
  A w[kCh][W], bias[kCh];
  load_weights_any<A, kCh, W>(p, c0, w, bias);

  const int nfull = (te - ts) / K;  // whole chunks; a run's last chunk may be partial (the tail below)
  const int64_t out_row = p.out_stride_l;
  T* out_t = out + int64_t(ts) * out_row;
  // A whole chunk's K rows are read from shared memory into rows[] and the taps index them directly, with
  // the H-row halo xw[0..H-1] of the previous chunk in front: the window shifts once per chunk (H rows),
  // not once per token (H rows x K), which removes ~3/4 of the register moves of the per-token form.
#pragma unroll 1
  for (int c = 0; c < nfull; ++c) {
    issue(c + S - 1);
    cp_async_wait<S - 1>();  // chunk c has landed (groups complete in order)
    const int t0 = ts + c * K;
    A rows[K][kCh];
    int srow[K];
#pragma unroll
    for (int s = 0; s < K; ++s) {
      Pack<T, kCh> cur;
      cur.v = stage[c % S][s][tid];
      srow[s] = seq_of<kSeq>(p, b, t0 + s);
#pragma unroll
      for (int i = 0; i < kCh; ++i) rows[s][i] = cur.template get<A>(i);
      A y[kCh];
#pragma unroll
      for (int i = 0; i < kCh; ++i) {
        // tap k of token s: chunk row r = s - H + k, or halo row H + r when r < 0
        const A pre = conv_pre<kSeq>(
            w[i], bias[i], srow[s],
            [&](int k) { const int r = s - H + k; return r < 0 ? xw[H + r][i] : rows[r < 0 ? 0 : r][i]; },
            [&](int k) { const int r = s - H + k; return r < 0 ? sw[H + r] : srow[r < 0 ? 0 : r]; });
        y[i] = activate(pre, p.silu);
      }
      store_stream<T, kCh>(out_t + s * out_row, y);
    }
    out_t += K * out_row;
#pragma unroll
    for (int j = 0; j < H; ++j) {  // K >= H: the new halo is the chunk's last H rows
      sw[j] = srow[K - H + j];
#pragma unroll
      for (int i = 0; i < kCh; ++i) xw[j][i] = rows[K - H + j][i];
    }
  }
  const int tail = te - ts - nfull * K;
  if (tail > 0) {  // the run's last, partial chunk: token by token, the window shifting per token
    issue(nfull + S - 1);
    cp_async_wait<S - 1>();
#pragma unroll
    for (int s = 0; s < K - 1; ++s) {
      if (s >= tail) break;
      Pack<T, kCh> cur;
      cur.v = stage[nfull % S][s][tid];
      sw[H] = seq_of<kSeq>(p, b, ts + nfull * K + s);
#pragma unroll
      for (int i = 0; i < kCh; ++i) xw[H][i] = cur.template get<A>(i);
      A y[kCh];
#pragma unroll
      for (int i = 0; i < kCh; ++i) y[i] = activate(conv_pre_window<kSeq>(w[i], bias[i], xw, sw, i), p.silu);
      store_stream<T, kCh>(out_t + s * out_row, y);
#pragma unroll
      for (int j = 0; j < H; ++j) {
        sw[j] = sw[j + 1];
#pragma unroll
        for (int i = 0; i < kCh; ++i) xw[j][i] = xw[j + 1][i];
      }
    }
  }
  cp_async_wait<0>();  // leave no copy in flight into shared memory of an exiting block
  if (p.final_out != nullptr && te == L) {
    T* fin = static_cast<T*>(p.final_out);
#pragma unroll
    for (int i = 0; i < kCh; ++i)
#pragma unroll
      for (int j = 0; j < H; ++j)
        fin[(int64_t(b) * p.dim + c0 + i) * H + j] = from_acc<T>(same_doc<kSeq>(sw[j], sw[H - 1]) ? xw[j][i] : A(0));
  }
}

// 32 KB of static shared memory per block; registers decide the rest (the launcher asks the occupancy API).
// S = kDeepStages: the "deep" variant (48 KB); kWide: the "wide" variant.
template <typename T, int W, int S = kAsyncStages, bool kWide = false>
__global__ void __launch_bounds__(128) fwd_async_kernel(ConvParams p) {
  __shared__ AsyncStage stage[S];
  if (p.seq_idx != nullptr) fwd_async_body<T, W, true, S, kWide>(p, stage);
  else fwd_async_body<T, W, false, S, kWide>(p, stage);
}

// Backward: 16-byte vectors for 4/8-byte types, 8-byte vectors (4 channels) for 16-bit types: a thread
// carries 2 x kCh x W fp32 of weights and dweight and two windows, so 8 channels would spill.
// One position of the streaming backward (bwd_stream and bwd_async kernels): x and dout of position pos
// (packs cx, cg; real = pos < L) enter the windows; d(pre-activation) at pos accumulates dbias / dweight; dx
// (or the initial-state gradient) at pos - H, whose taps are all in the window now, is written; the windows
// shift by one.
template <typename T, int W, bool kSeq, int kCh, typename A = acc_t<T>>
__device__ __forceinline__ void bwd_stream_position(const ConvParams& p, const Pack<T, kCh>& cx, const Pack<T, kCh>& cg,
                                                    bool real, int pos, int ts, int te, int L, bool want_dinit,
                                                    int b, int c0, int seq_last, const T* dfinal, T* dx,
                                                    const A (&w)[kCh][W], const A (&bias)[kCh], A (&xw)[W][kCh],
                                                    A (&gw)[W][kCh], int (&sw)[W], A (&dw)[kCh][W], A (&db)[kCh]) {
  constexpr int H = W - 1;
#pragma unroll
  for (int i = 0; i < kCh; ++i) {
    xw[H][i] = real ? cx.template get<A>(i) : A(0);
    A g = A(0);
    if (real) {
      A pre = bias[i];
#pragma unroll
      for (int k = 0; k < W; ++k) pre += w[i][k] * (same_doc<kSeq>(sw[k], sw[H]) ? xw[k][i] : A(0));
      g = cg.template get<A>(i) * activate_grad(pre, p.silu);
      if (pos < te) {
        db[i] += g;
#pragma unroll
        for (int k = 0; k < W; ++k) dw[i][k] += g * (same_doc<kSeq>(sw[k], sw[H]) ? xw[k][i] : A(0));
      }
    }
    gw[H][i] = g;
  }
  // dx at s = pos - H needs dpre at s .. s+H: all in the window now.
  const int sx = pos - H;
  if ((sx >= ts || (want_dinit && sx >= -H)) && sx < te) {
    A g[kCh];
#pragma unroll
    for (int i = 0; i < kCh; ++i) {
      A acc = A(0);
#pragma unroll
      for (int k = 0; k < W; ++k) acc += w[i][k] * (same_doc<kSeq>(sw[0], sw[H - k]) ? gw[H - k][i] : A(0));
      if (dfinal != nullptr && sx >= L - H && same_doc<kSeq>(sw[0], seq_last))
        acc += to_acc<A>(dfinal[b * p.dfinal_stride_b + (c0 + i) * p.dfinal_stride_c +
                                (sx - (L - H)) * p.dfinal_stride_k]);
      g[i] = acc;
    }
    if (sx >= 0) {
      store_stream<T, kCh>(dx + sx * p.out_stride_l, g);
    } else {
      T* dinit = static_cast<T*>(p.dinit);
#pragma unroll
      for (int i = 0; i < kCh; ++i) dinit[(int64_t(b) * p.dim + c0 + i) * H + H + sx] = from_acc<T>(g[i]);
    }
  }
#pragma unroll
  for (int j = 0; j < H; ++j) {
    sw[j] = sw[j + 1];
#pragma unroll
    for (int i = 0; i < kCh; ++i) { xw[j][i] = xw[j + 1][i]; gw[j][i] = gw[j + 1][i]; }
  }
}

template <typename T> using BwdStreamCh = BwdCh<T>;  // channels per thread: as the token-major backward
// Tokens per chunk of the backward: 64 bytes of x and of dout per thread per chunk (8 tokens of 16-bit
// types, 4 of fp32/fp64), so the four chunk buffers stay at 64 registers.
template <typename T> struct BwdStreamChunk {
  static constexpr int value = 64 / (BwdStreamCh<T>::value * int(sizeof(T)));
};

// Block (32, 4): 32 x kCh channels x 4 token runs of split_len; grid (ceil(dim / (32 kCh)), nsplit, batch).
// A thread streams positions p = ts .. te+H-1: loads x[p], dout[p]; pre[p] from the x window; dpre[p] =
// dout[p] act'(pre[p]); dweight/dbias for p < te; then dx[p-H] from the dpre window (dinit when p-H < 0).
template <typename T, int W, bool kSeq>
__device__ __forceinline__ void bwd_stream_body(const ConvParams& p, acc_t<T> (&dw)[BwdStreamCh<T>::value][W],
                                                acc_t<T> (&db)[BwdStreamCh<T>::value]) {
  using A = acc_t<T>;
  constexpr int kCh = BwdStreamCh<T>::value;
  constexpr int H = W - 1;
  constexpr int K = BwdStreamChunk<T>::value;
  const int c0 = (blockIdx.x * 32 + threadIdx.x) * kCh;
  const int ts = (blockIdx.y * blockDim.y + threadIdx.y) * p.split_len;
  const int b = blockIdx.z;
  const int L = p.seqlen;
#pragma unroll
  for (int i = 0; i < kCh; ++i) {
    db[i] = A(0);
#pragma unroll
    for (int k = 0; k < W; ++k) dw[i][k] = A(0);
  }
  if (c0 >= p.dim || ts >= L) return;
  const int te = min(ts + p.split_len, L);
  const int pend = te + H;            // positions ts .. pend-1 are visited
  const int lend = min(pend, L);      // of which ts .. lend-1 exist
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + c0;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride_b + c0;
  T* dx = static_cast<T*>(p.out) + b * p.out_stride_b + c0;
  const T* init = static_cast<const T*>(p.init);
  const T* dfinal = static_cast<const T*>(p.dfinal);
  const bool want_dinit = ts == 0 && init != nullptr && p.dinit != nullptr;
  const int seq_last = seq_of<kSeq>(p, b, L - 1);

  Pack<T, kCh> cx[K], cg[K], nx[K], ng[K];
#pragma unroll
  for (int s = 0; s < K; ++s) {
    const int t = ts + s;
    if (t < lend) { load_stream(cx[s], x + t * p.x_stride_l); load_stream(cg[s], dout + t * p.dout_stride_l); }
    else { cx[s].zero(); cg[s].zero(); }
  }
  A xw[W][kCh], gw[W][kCh];
  int sw[W];
  load_halo<T, W, kSeq, false>(p, x, init, ts, b, c0, xw, sw);
#pragma unroll
  for (int j = 0; j < H; ++j)  // dpre before the run is never needed: dx at s >= ts reads dpre at s .. s+H
#pragma unroll
    for (int i = 0; i < kCh; ++i) gw[j][i] = A(0);
  A w[kCh][W], bias[kCh];
  load_weights_any<A, kCh, W>(p, c0, w, bias);

#pragma unroll 1
  for (int p0 = ts; p0 < pend; p0 += K) {
#pragma unroll
    for (int s = 0; s < K; ++s) {
      const int t = p0 + K + s;
      if (t < lend) { load_stream(nx[s], x + t * p.x_stride_l); load_stream(ng[s], dout + t * p.dout_stride_l); }
    }
#pragma unroll
    for (int s = 0; s < K; ++s) {
      const int pos = p0 + s;
      if (pos >= pend) break;
      sw[H] = pos < L ? seq_of<kSeq>(p, b, pos) : seq_last;
      const bool real = pos < L;
      bwd_stream_position<T, W, kSeq>(p, cx[s], cg[s], real, pos, ts, te, L, want_dinit, b, c0, seq_last, dfinal, dx, w,
                                      bias, xw, gw, sw, dw, db);
    }
#pragma unroll
    for (int s = 0; s < K; ++s) { cx[s] = nx[s]; cg[s] = ng[s]; }
  }
}

// (128, 3): 168 registers at most, 12 warps per SM; the host plans one wave of 3 blocks per SM.
template <typename T, int W>
__global__ void __launch_bounds__(128, 3) bwd_stream_kernel(ConvParams p) {
  using A = acc_t<T>;
  constexpr int kCh = BwdStreamCh<T>::value;
  A dw[kCh][W], db[kCh];
  if (p.seq_idx != nullptr) bwd_stream_body<T, W, true>(p, dw, db);
  else bwd_stream_body<T, W, false>(p, dw, db);
  __shared__ A red[4][32 * kCh][W + 1];
  bwd_block_partials<T, W>(p, dw, db, red);
}

// ------------------------------------------------------------- backward, stream + cp.async (APRIEL_CONV1D_BWD_IMPL=async)
// The stream backward with its x/dout chunks staged through shared memory (cp.async, 8-byte copies of 4
// 16-bit channels, 16-byte copies otherwise) instead of register double buffers: kAsyncStages slots of
// BwdAsyncSlots<T>::kChunk tokens, 3 chunks ahead (192 B of x + dout in flight per thread). Same per-thread ownership of slots (no barrier until the final
// dweight reduction) and the same run/window/emission logic as bwd_stream_body.
template <int Bytes>
__device__ __forceinline__ void cp_async_small(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(gmem) : "memory");
  }
}

template <int Bytes>
__device__ __forceinline__ void cp_async_small_u32(unsigned dst, const void* gmem) {
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(gmem) : "memory");
  }
}

// Tokens per chunk: 4 for 16-bit types (8-byte slots), 2 otherwise (16-byte slots): 32 KB of slots.
template <typename T, int S = kAsyncStages>
struct BwdAsyncSlots {
  using V = typename Pack<T, BwdStreamCh<T>::value>::V;
  static constexpr int kChunk = sizeof(V) == 8 ? 4 : 2;
  V x[S][kChunk][128];
  V g[S][kChunk][128];
};

// kWide (APRIEL_CONV1D_BWD_IMPL=wide): the block's 4 warps take 4 adjacent channel segments of one token
// run (1 KB contiguous per token row and tensor for 16-bit types) instead of one 256-byte segment of 4 runs.
template <typename T, int W, bool kSeq, int S, bool kWide>
__device__ __forceinline__ void bwd_async_body(const ConvParams& p, BwdAsyncSlots<T, S>& slots,
                                               acc_t<T> (&dw)[BwdStreamCh<T>::value][W],
                                               acc_t<T> (&db)[BwdStreamCh<T>::value]) {
  using A = acc_t<T>;
  constexpr int kCh = BwdStreamCh<T>::value;
  constexpr int H = W - 1;
  constexpr int K = BwdAsyncSlots<T, S>::kChunk;
  constexpr int kBytes = int(sizeof(typename BwdAsyncSlots<T, S>::V));
  const int c0 = kWide ? ((blockIdx.x * 4 + threadIdx.y) * 32 + threadIdx.x) * kCh : (blockIdx.x * 32 + threadIdx.x) * kCh;
  const int ts = kWide ? blockIdx.y * p.split_len : (blockIdx.y * blockDim.y + threadIdx.y) * p.split_len;
  const int b = blockIdx.z;
  const int L = p.seqlen;
  const int tid = threadIdx.y * 32 + threadIdx.x;
#pragma unroll
  for (int i = 0; i < kCh; ++i) {
    db[i] = A(0);
#pragma unroll
    for (int k = 0; k < W; ++k) dw[i][k] = A(0);
  }
  if (c0 >= p.dim || ts >= L) return;
  const int te = min(ts + p.split_len, L);
  const int pend = te + H;
  const int lend = min(pend, L);
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + c0;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride_b + c0;
  T* dx = static_cast<T*>(p.out) + b * p.out_stride_b + c0;
  const T* init = static_cast<const T*>(p.init);
  const T* dfinal = static_cast<const T*>(p.dfinal);
  const bool want_dinit = ts == 0 && init != nullptr && p.dinit != nullptr;
  const int seq_last = seq_of<kSeq>(p, b, L - 1);

  // Chunks are issued in order: source pointers and shared addresses advance by constants (the 64-bit row
  // math and generic -> shared conversions once, not per token).
  const int64_t x_row = p.x_stride_l, g_row = p.dout_stride_l;
  const T* x_next = x + int64_t(ts) * x_row;
  const T* g_next = dout + int64_t(ts) * g_row;
  const unsigned xs0 = static_cast<unsigned>(__cvta_generic_to_shared(&slots.x[0][0][tid]));
  const unsigned gs0 = static_cast<unsigned>(__cvta_generic_to_shared(&slots.g[0][0][tid]));
  constexpr unsigned kSlotBytes = sizeof(slots.x[0]), kRowBytes = sizeof(slots.x[0][0]);
  auto issue = [&](int chunk) {
    const unsigned off = (chunk % S) * kSlotBytes;
    const int t = ts + chunk * K;
#pragma unroll
    for (int s = 0; s < K; ++s) {
      if (t + s < lend) {
        cp_async_small_u32<kBytes>(xs0 + off + s * kRowBytes, x_next + s * x_row);
        cp_async_small_u32<kBytes>(gs0 + off + s * kRowBytes, g_next + s * g_row);
      }
    }
    x_next += K * x_row;
    g_next += K * g_row;
    cp_async_commit();
  };
#pragma unroll
  for (int c = 0; c < S - 1; ++c) issue(c);

  A xw[W][kCh], gw[W][kCh];
  int sw[W];
  load_halo<T, W, kSeq, false>(p, x, init, ts, b, c0, xw, sw);
#pragma unroll
  for (int j = 0; j < H; ++j)  // dpre before the run is never needed: dx at s >= ts reads dpre at s .. s+H
#pragma unroll
    for (int i = 0; i < kCh; ++i) gw[j][i] = A(0);
  A w[kCh][W], bias[kCh];
  load_weights_any<A, kCh, W>(p, c0, w, bias);

  const int nchunks = (pend - ts + K - 1) / K;
  T* dx_t = dx + int64_t(ts) * p.out_stride_l;  // dx row of position ts + H (the first fast chunk's first output)
#pragma unroll 1
  for (int c = 0; c < nchunks; ++c) {
    issue(c + S - 1);
    cp_async_wait<S - 1>();
    const int p0 = ts + c * K;
    if (p0 - H >= ts && p0 + K <= te) {
      // Interior chunk (almost all of them): every position is real, inside the run, and emits dx for a
      // position inside the run (>= 0, no initial-state or final-state term), so none of the per-position
      // tests of bwd_stream_position apply. Taps index (halo ++ chunk) rows statically; the windows move
      // once per chunk instead of once per position (the per-position form spent ~40 % of its instructions
      // on register moves, branches and address math: SASS of session 3).
      A xr[K][kCh], gr[K][kCh];
      int sr[K];
#pragma unroll
      for (int s = 0; s < K; ++s) {
        Pack<T, kCh> cx, cg;
        cx.v = slots.x[c % S][s][tid];
        cg.v = slots.g[c % S][s][tid];
        sr[s] = seq_of<kSeq>(p, b, p0 + s);
#pragma unroll
        for (int i = 0; i < kCh; ++i) xr[s][i] = cx.template get<A>(i);
#pragma unroll
        for (int i = 0; i < kCh; ++i) {
          A pre = bias[i];
          A xt[W];
#pragma unroll
          for (int k = 0; k < W; ++k) {
            const int r = s - H + k;  // tap k of position s: chunk row r, or halo row H + r when r < 0
            const A v = r < 0 ? xw[H + r < 0 ? 0 : H + r][i] : xr[r < 0 ? 0 : r][i];
            const int sv = r < 0 ? sw[H + r < 0 ? 0 : H + r] : sr[r < 0 ? 0 : r];
            xt[k] = same_doc<kSeq>(sv, sr[s]) ? v : A(0);
            pre += w[i][k] * xt[k];
          }
          const A g = cg.template get<A>(i) * activate_grad(pre, p.silu);
          gr[s][i] = g;
          db[i] += g;
#pragma unroll
          for (int k = 0; k < W; ++k) dw[i][k] += g * xt[k];
        }
        // dx at position p0 + s - H: taps dpre at p0 + s - k, k = 0..H (chunk row s - k or halo row H + s - k)
        A d[kCh];
        const int sx = s - H;  // row of the emitted position in (halo ++ chunk) terms: halo row H + sx if < 0
        const int sd = sx < 0 ? sw[H + sx < 0 ? 0 : H + sx] : sr[sx < 0 ? 0 : sx];
#pragma unroll
        for (int i = 0; i < kCh; ++i) {
          A acc = A(0);
#pragma unroll
          for (int k = 0; k < W; ++k) {
            const int r = s - k;
            const A gv = r < 0 ? gw[H + r < 0 ? 0 : H + r][i] : gr[r < 0 ? 0 : r][i];
            const int sv = r < 0 ? sw[H + r < 0 ? 0 : H + r] : sr[r < 0 ? 0 : r];
            acc += w[i][k] * (same_doc<kSeq>(sd, sv) ? gv : A(0));
          }
          d[i] = acc;
        }
        store_stream<T, kCh>(dx_t + int64_t(p0 + s - H - ts) * p.out_stride_l, d);
      }
      // New halo: combined (halo ++ chunk) rows K .. K + H - 1 (ascending j reads index K + j > j).
#pragma unroll
      for (int j = 0; j < H; ++j) {
        const int src = K + j;  // combined index; chunk row src - H when src >= H
        if (src < H) {
          sw[j] = sw[src < H ? src : 0];
#pragma unroll
          for (int i = 0; i < kCh; ++i) { xw[j][i] = xw[src < H ? src : 0][i]; gw[j][i] = gw[src < H ? src : 0][i]; }
        } else {
          sw[j] = sr[src < H ? 0 : src - H];
#pragma unroll
          for (int i = 0; i < kCh; ++i) { xw[j][i] = xr[src < H ? 0 : src - H][i]; gw[j][i] = gr[src < H ? 0 : src - H][i]; }
        }
      }
      continue;
    }
#pragma unroll
    for (int s = 0; s < K; ++s) {
      const int pos = ts + c * K + s;
      if (pos >= pend) break;
      sw[H] = pos < L ? seq_of<kSeq>(p, b, pos) : seq_last;
      const bool real = pos < L;
      Pack<T, kCh> cx, cg;
      if (real) {
        cx.v = slots.x[c % S][s][tid];
        cg.v = slots.g[c % S][s][tid];
      }
      bwd_stream_position<T, W, kSeq>(p, cx, cg, real, pos, ts, te, L, want_dinit, b, c0, seq_last, dfinal, dx, w,
                                      bias, xw, gw, sw, dw, db);
    }
  }
  cp_async_wait<0>();
}

// Sum of the (batch * nsplit) partial rows of column `col` (channel * (W+1) + tap) in row order: the same
// fixed order, hence the same fp32 result, as reduce_dweight_kernel. __ldcg: the partials were written by
// other SMs (L2), never cached in this SM's L1.
__device__ __forceinline__ void reduce_dweight_column(const float* ws, int rows, int cols, int width, int col,
                                                      float* dweight, float* dbias) {
  float sum = 0.f;
  int r = 0;
  for (; r + 4 <= rows; r += 4) {  // 4 independent loads in flight, added in row order
    const float a = __ldcg(ws + int64_t(r) * cols + col), b = __ldcg(ws + int64_t(r + 1) * cols + col);
    const float c = __ldcg(ws + int64_t(r + 2) * cols + col), d = __ldcg(ws + int64_t(r + 3) * cols + col);
    sum += a;
    sum += b;
    sum += c;
    sum += d;
  }
  for (; r < rows; ++r) sum += __ldcg(ws + int64_t(r) * cols + col);
  const int c = col / (width + 1), k = col % (width + 1);
  if (k < width) dweight[c * width + k] = sum;
  else if (dbias != nullptr) dbias[c] = sum;
}

// 32 KB (S = 4, "async") or 48 KB (S = 6, "deep"/"fused") of static shared memory: the slots, reused for
// the dweight reduction once every run is done. (128, 3): the host plans one wave of 3 blocks per SM, as
// for the stream kernel.
// kFused ("fused"; launched cooperatively, the whole grid resident): after every block has written its
// partial row, a grid-wide barrier, then all blocks together sum the partial columns (one column per
// thread, grid-strided) into dweight/dbias: no second kernel launch, and the ~1 MB partial round trip is
// spread over the whole GPU instead of 80 blocks.
// kWide: every thread owns distinct channels of the block's single run, so it writes its own partial row
// (b * nsplit + run) directly: no block reduction, but nsplit = runs, 4x the partial rows of the others.
template <typename T, int W, int S = kAsyncStages, bool kFused = false, bool kWide = false>
__global__ void __launch_bounds__(128, 3) bwd_async_kernel(ConvParams p) {
  using A = acc_t<T>;
  constexpr int kCh = BwdStreamCh<T>::value;
  __shared__ union {
    BwdAsyncSlots<T, S> slots;
    A red[4][32 * kCh][W + 1];
  } smem;
  A dw[kCh][W], db[kCh];
  if (p.seq_idx != nullptr) bwd_async_body<T, W, true, S, kWide>(p, smem.slots, dw, db);
  else bwd_async_body<T, W, false, S, kWide>(p, smem.slots, dw, db);
  if constexpr (kWide) {
    const int c0 = ((blockIdx.x * 4 + threadIdx.y) * 32 + threadIdx.x) * kCh;
    if (c0 < p.dim) {
      float* ws = p.workspace + (int64_t(blockIdx.z) * p.nsplit + blockIdx.y) * p.dim * (W + 1);
#pragma unroll
      for (int i = 0; i < kCh; ++i) {
#pragma unroll
        for (int k = 0; k < W; ++k) ws[int64_t(c0 + i) * (W + 1) + k] = static_cast<float>(dw[i][k]);
        ws[int64_t(c0 + i) * (W + 1) + W] = static_cast<float>(db[i]);
      }
    }
  } else {
    __syncthreads();  // every thread is past its loop (and its cp.async waits): the slots are dead
    bwd_block_partials<T, W>(p, dw, db, smem.red);
  }
  if constexpr (kFused) {
    cooperative_groups::this_grid().sync();  // every partial row is written and visible grid-wide
    const int cols = p.dim * (W + 1);
    const int rows = p.batch * p.nsplit;
    const int64_t nthreads = int64_t(gridDim.x) * gridDim.y * gridDim.z * 128;
    const int64_t block = (int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    for (int64_t col = block * 128 + threadIdx.y * 32 + threadIdx.x; col < cols; col += nthreads)
      reduce_dweight_column(p.workspace, rows, cols, W, int(col), p.dweight, p.dbias);
  }
}

// ====================================================================================== launchers
inline int cdiv(int64_t a, int64_t b) { return int((a + b - 1) / b); }

// Blocks of `kernel` resident per SM at `threads` threads (the occupancy API; 1 if it fails).
template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0) != cudaSuccess || n < 1) {
    (void)cudaGetLastError();
    n = 1;
  }
  return n;
}

inline int current_num_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 132;
  }
  return n;
}

// One wave: (resident blocks per SM) x SMs blocks of 4 runs, the token runs split evenly over them.
template <typename T, int W, bool kAsync, int S = kAsyncStages>
void launch_fwd_stream(ConvParams p, cudaStream_t stream) {
  constexpr int kCh = 16 / sizeof(T);
  if (kAsync && p.fwd_impl == kFwdWide) {
    // One wave of blocks, each one run of split_len tokens x 4 adjacent channel segments.
    static const int per_sm_wide = blocks_per_sm(fwd_async_kernel<T, W, kAsyncStages, true>, 128);
    const int64_t chan_blocks = cdiv(p.dim, 128 * kCh);
    int64_t runs = std::max<int64_t>(1, int64_t(per_sm_wide) * current_num_sms() / (chan_blocks * p.batch));
    runs = std::min<int64_t>({runs, cdiv(p.seqlen, kStreamChunk), 65535});
    p.split_len = cdiv(cdiv(p.seqlen, runs), kStreamChunk) * kStreamChunk;
    runs = cdiv(p.seqlen, p.split_len);
    const dim3 grid(int(chan_blocks), int(runs), p.batch);
    fwd_async_kernel<T, W, kAsyncStages, true><<<grid, dim3(32, 4), 0, stream>>>(p);
    return;
  }
  static const int per_sm = kAsync ? blocks_per_sm(fwd_async_kernel<T, W, S>, 128) : blocks_per_sm(fwd_stream_kernel<T, W>, 128);
  const int64_t chan_blocks = cdiv(p.dim, 32 * kCh);
  const int64_t target_runs = int64_t(per_sm) * current_num_sms() * 4;
  int64_t runs = std::max<int64_t>(1, target_runs / (chan_blocks * p.batch));
  runs = std::min<int64_t>(runs, cdiv(p.seqlen, kStreamChunk));
  // Runs stay whole 8-token chunks although the async kernels take any length: at b1 L8192 4096 ch, 63-token
  // runs (528 blocks, every slot of an H100) measured 0.0523 ms in a graph against 0.0511 for 64-token runs
  // (512 blocks): the 3-token tail of each run costs more than the 16 idle slots (session 3).
  p.split_len = cdiv(cdiv(p.seqlen, runs), kStreamChunk) * kStreamChunk;
  runs = cdiv(p.seqlen, p.split_len);
  const dim3 grid(int(chan_blocks), cdiv(runs, 4), p.batch);
  if (kAsync) fwd_async_kernel<T, W, S><<<grid, dim3(32, 4), 0, stream>>>(p);
  else fwd_stream_kernel<T, W><<<grid, dim3(32, 4), 0, stream>>>(p);
}

template <typename T, int W, bool kVecW>
void launch_fwd_vec(const ConvParams& p, cudaStream_t stream) {
  constexpr int kCh = 16 / sizeof(T);
  const dim3 block(32, 4);
  if (p.fwd_tokens == 4) {
    const dim3 grid(cdiv(p.dim, 32 * kCh), cdiv(p.seqlen, 4 * 4), p.batch);
    fwd_tokmajor_kernel<T, W, 4, kVecW><<<grid, block, 0, stream>>>(p);
  } else {
    const dim3 grid(cdiv(p.dim, 32 * kCh), cdiv(p.seqlen, 4 * 8), p.batch);
    fwd_tokmajor_kernel<T, W, 8, kVecW><<<grid, block, 0, stream>>>(p);
  }
}

template <typename T, int W>
void launch_fwd_w(const ConvParams& p, cudaStream_t stream) {
  if (p.vectorized && p.fwd_impl == kFwdWide) {
    launch_fwd_stream<T, W, true>(p, stream);
  } else if (p.vectorized && p.fwd_impl == kFwdDeep) {
    launch_fwd_stream<T, W, true, kDeepStages>(p, stream);
  } else if (p.vectorized && p.fwd_impl == kFwdAsync) {
    launch_fwd_stream<T, W, true>(p, stream);
  } else if (p.vectorized && p.fwd_impl == kFwdStream) {
    launch_fwd_stream<T, W, false>(p, stream);
  } else if (p.vectorized) {
    if (p.weight_vec) launch_fwd_vec<T, W, true>(p, stream);
    else launch_fwd_vec<T, W, false>(p, stream);
  } else if (sizeof(T) <= 4 && p.chan_vec) {
    if constexpr (sizeof(T) <= 4) {  // the host sets chan_vec only for 2- and 4-byte types
      constexpr int kV = 16 / sizeof(T);
      const dim3 grid(p.batch * p.dim, cdiv(p.seqlen, kCmVecs * 128 * kV));
      fwd_chanmajor_kernel<T, W><<<grid, 128, 0, stream>>>(p);
    }
  } else {
    const int64_t total = int64_t(p.batch) * p.dim * p.seqlen;
    fwd_generic_kernel<T, W><<<cdiv(total, 256), 256, 0, stream>>>(p);
  }
  APRIEL_CHECK_LAUNCH();
}

// The fused backward ("fused"): a cooperative launch when the planned grid fits in one wave of resident
// blocks (grid.sync needs every block resident); otherwise the same kernel without the fused reduction
// ("deep") and the reduction kernel. Returns whether the reduction was fused.
template <typename T, int W, bool kWide = false>
bool launch_bwd_fused(const ConvParams& p, const dim3& grid, cudaStream_t stream) {
  static const int per_sm = blocks_per_sm(bwd_async_kernel<T, W, kDeepStages, true, kWide>, 128);
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  if (blocks <= int64_t(per_sm) * current_num_sms()) {
    ConvParams q = p;
    void* args[] = {&q};
    const cudaError_t status = cudaLaunchCooperativeKernel(
        reinterpret_cast<const void*>(&bwd_async_kernel<T, W, kDeepStages, true, kWide>), grid, dim3(32, 4), args, 0,
        stream);
    if (status == cudaSuccess) return true;
    // Refused (e.g. fewer SMs available than counted): take the unfused path rather than throw - an
    // exception out of the extension kills the process on the GPU machine (docs/notes/STATUS.md item 4).
    (void)cudaGetLastError();
  }
  bwd_async_kernel<T, W, kDeepStages, false, kWide><<<grid, dim3(32, 4), 0, stream>>>(p);
  return false;
}

// Token tile of the vectorised backward; the host picks split_len as a multiple of 4 * kBwdTok.
constexpr int kBwdTok = 8;

template <typename T, int W>
void launch_bwd_w(const ConvParams& p, cudaStream_t stream) {
  if (p.vectorized && p.bwd_impl != kFwdTile) {
    // Host-planned (it sized the workspace): nsplit block rows of 4 runs of split_len tokens.
    const dim3 grid(cdiv(p.dim, 32 * BwdStreamCh<T>::value), p.nsplit, p.batch);
    if (p.bwd_impl == kFwdWide) {  // nsplit = runs; grid.x = blocks of 4 x 32 x kCh channels
      const dim3 wide(cdiv(p.dim, 128 * BwdStreamCh<T>::value), p.nsplit, p.batch);
      const bool fused = launch_bwd_fused<T, W, true>(p, wide, stream);
      APRIEL_CHECK_LAUNCH();
      if (fused) return;
    } else if (p.bwd_impl == kBwdFused) {
      const bool fused = launch_bwd_fused<T, W>(p, grid, stream);
      APRIEL_CHECK_LAUNCH();
      if (fused) return;
    } else if (p.bwd_impl == kFwdDeep) {
      bwd_async_kernel<T, W, kDeepStages, false><<<grid, dim3(32, 4), 0, stream>>>(p);
    } else if (p.bwd_impl == kFwdAsync) {
      bwd_async_kernel<T, W><<<grid, dim3(32, 4), 0, stream>>>(p);
    } else {
      bwd_stream_kernel<T, W><<<grid, dim3(32, 4), 0, stream>>>(p);
    }
  } else if (sizeof(T) <= 4 && p.chan_vec) {
    if constexpr (sizeof(T) <= 4) {  // host: nsplit = token tiles of kCmTileVecs vectors
      bwd_chanmajor_kernel<T, W><<<dim3(p.batch * p.dim, p.nsplit), 128, 0, stream>>>(p);
    }
  } else if (p.vectorized) {
    constexpr int kCh = BwdCh<T>::value;
    const dim3 grid(cdiv(p.dim, 32 * kCh), p.nsplit, p.batch);
    if (p.weight_vec) bwd_tokmajor_kernel<T, W, kBwdTok, true><<<grid, dim3(32, 4), 0, stream>>>(p);
    else bwd_tokmajor_kernel<T, W, kBwdTok, false><<<grid, dim3(32, 4), 0, stream>>>(p);
  } else {
    const dim3 grid(cdiv(p.dim, p.tok_fast ? 8 : 32), p.nsplit, p.batch);
    bwd_generic_kernel<T, W><<<grid, dim3(32, 8), 0, stream>>>(p);
  }
  APRIEL_CHECK_LAUNCH();
  const int cols = p.dim * (p.width + 1);
  reduce_dweight_kernel<<<cdiv(cols, 256), 256, 0, stream>>>(p.workspace, p.batch * p.nsplit, p.dim, p.width,
                                                              p.dweight, p.dbias);
  APRIEL_CHECK_LAUNCH();
}

template <typename T>
void launch_fwd(const ConvParams& p, cudaStream_t stream) {
  switch (p.width) {  // 3 widths x 10 kernels: {4, 8}-token tiles x {scalar, vector} weights, stream, async, deep, wide, channel-major (not fp64), generic
    case 2: launch_fwd_w<T, 2>(p, stream); break;
    case 3: launch_fwd_w<T, 3>(p, stream); break;
    default: launch_fwd_w<T, 4>(p, stream); break;
  }
}

template <typename T>
void launch_bwd(const ConvParams& p, cudaStream_t stream) {
  switch (p.width) {  // 3 widths x 10 kernels: {scalar, vector} weights, stream, async, deep, {fused, wide} x {cooperative, fallback}, generic; + 1 reduction
    case 2: launch_bwd_w<T, 2>(p, stream); break;
    case 3: launch_bwd_w<T, 3>(p, stream); break;
    default: launch_bwd_w<T, 4>(p, stream); break;
  }
}

template <typename T>
void launch_update(const UpdateParams& p, cudaStream_t stream) {
  const int64_t total = int64_t(p.batch) * p.dim;
  if (total == 0) return;
  update_kernel<T><<<cdiv(total, 128), 128, 0, stream>>>(p);  // width is a runtime loop bound: 1 kernel
  APRIEL_CHECK_LAUNCH();
}


// Registers the width-4 kernels of dtype T with the introspection registry (kernel_registry.h): the
// shapes the benchmarks run. kBwd: the backward kernels (and, for fp32, the weight-gradient reduction), else the
// forward and update kernels - each half in its own translation unit (conv1d_<dtype>_{fwd,bwd}.cu), since taking
// a kernel's address instantiates it. Returns true so it can initialise a static.
template <typename T, bool kBwd>
bool register_kernels(const char* dtype) {
  struct Entry {
    const char* kind;
    const char* args;  // template arguments after the dtype (nullptr: none)
    const void* func;
    int threads;
  };
  auto fn = [](auto* kernel) { return reinterpret_cast<const void*>(kernel); };
  constexpr bool kChanMajor = sizeof(T) <= 4;  // (not instantiated for 8-byte types)
  static char names[12][64];
  Entry list[12];
  int n = 0;
  if constexpr (kBwd) {
    list[n++] = {"bwd_async", "W4", fn(&bwd_async_kernel<T, 4>), 128};
    list[n++] = {"bwd_deep", "W4", fn(&bwd_async_kernel<T, 4, kDeepStages, false>), 128};
    list[n++] = {"bwd_fused", "W4", fn(&bwd_async_kernel<T, 4, kDeepStages, true>), 128};
    list[n++] = {"bwd_wide", "W4", fn(&bwd_async_kernel<T, 4, kDeepStages, true, true>), 128};
    if constexpr (kChanMajor) list[n++] = {"bwd_chanmajor", "W4", fn(&bwd_chanmajor_kernel<T, 4>), 128};
    list[n++] = {"bwd_tile", "W4,vecw", fn(&bwd_tokmajor_kernel<T, 4, kBwdTok, true>), 128};
    list[n++] = {"bwd_stream", "W4", fn(&bwd_stream_kernel<T, 4>), 128};
    list[n++] = {"bwd_generic", "W4", fn(&bwd_generic_kernel<T, 4>), 256};
  } else {
    list[n++] = {"fwd_async", "W4", fn(&fwd_async_kernel<T, 4>), 128};
    list[n++] = {"fwd_deep", "W4", fn(&fwd_async_kernel<T, 4, kDeepStages>), 128};
    list[n++] = {"fwd_wide", "W4", fn(&fwd_async_kernel<T, 4, kAsyncStages, true>), 128};
    if constexpr (kChanMajor) list[n++] = {"fwd_chanmajor", "W4", fn(&fwd_chanmajor_kernel<T, 4>), 128};
    list[n++] = {"fwd_tile", "W4,tok8,vecw", fn(&fwd_tokmajor_kernel<T, 4, 8, true>), 128};
    list[n++] = {"fwd_tile", "W4,tok4,vecw", fn(&fwd_tokmajor_kernel<T, 4, 4, true>), 128};
    list[n++] = {"fwd_tile", "W4,tok8,scalarw", fn(&fwd_tokmajor_kernel<T, 4, 8, false>), 128};
    list[n++] = {"fwd_stream", "W4", fn(&fwd_stream_kernel<T, 4>), 128};
    list[n++] = {"fwd_generic", "W4", fn(&fwd_generic_kernel<T, 4>), 256};
    list[n++] = {"update", nullptr, fn(&update_kernel<T>), 128};
  }
  for (int i = 0; i < n; ++i) {
    if (list[i].args != nullptr) snprintf(names[i], sizeof(names[i]), "%s<%s,%s>", list[i].kind, dtype, list[i].args);
    else snprintf(names[i], sizeof(names[i]), "%s<%s>", list[i].kind, dtype);
    register_kernel({"conv1d", names[i], list[i].func, list[i].threads});
  }
  if (kBwd && strcmp(dtype, "fp32") == 0)
    register_kernel({"conv1d", "reduce_dweight", reinterpret_cast<const void*>(&reduce_dweight_kernel), 256});
  return true;
}
}  // namespace conv1d
}  // namespace apriel

// Defines the launchers of one dtype (see APRIEL_CONV1D_DECLARE in conv1d_params.h) in two translation units per
// dtype, so that the build's longest compile is half of one dtype's kernels (session 27: one TU per dtype took 72-78 s
// of the 85 s build on the GPU machine with 16 jobs; bench/results/s27/suite_8135245/ninja_log.txt):
// APRIEL_CONV1D_DEFINE_FWD = forward + update (conv1d_<dtype>_fwd.cu), APRIEL_CONV1D_DEFINE_BWD = backward.
#define APRIEL_CONV1D_DEFINE_FWD(suffix, T)                                                          \
  namespace apriel {                                                                                 \
  namespace conv1d {                                                                                 \
  void causal_conv1d_fwd_##suffix(const ConvParams& p, cudaStream_t s) { launch_fwd<T>(p, s); }      \
  void causal_conv1d_update_##suffix(const UpdateParams& p, cudaStream_t s) { launch_update<T>(p, s); } \
  static const bool kernels_registered_##suffix = register_kernels<T, false>(#suffix);              \
  }                                                                                                  \
  }
#define APRIEL_CONV1D_DEFINE_BWD(suffix, T)                                                          \
  namespace apriel {                                                                                 \
  namespace conv1d {                                                                                 \
  void causal_conv1d_bwd_##suffix(const ConvParams& p, cudaStream_t s) { launch_bwd<T>(p, s); }      \
  static const bool kernels_registered_##suffix = register_kernels<T, true>(#suffix);               \
  }                                                                                                  \
  }
