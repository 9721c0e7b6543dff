// Fused Apriel-H1 mixer scan, forward, v4: in_proj output (z, x, B, C) + dt_low -> y (b, L, D).
//
// Why a v4: v3 (mixer_scan_fwd.cuh) gave every thread ONE state of a channel (K = 16 lanes per channel), so
// each (channel, state, token) element paid its own shared-memory loads of delta/u/B/C and a 16-lane
// reduction, and the tile staging went through per-element global loads with index math: 35 instructions
// per element against the ~8 a MUFU-bound kernel can afford (docs/notes/scan.md, ncu). v4:
// - thread (channel, lane j of K=4) owns 4 states: per token one 8-byte (delta, delta*u) load and two
//   16-byte B / C loads serve 4 states, and the readout reduction is 2 shuffle levels (reduce-scatter);
// - the time tile (x, B, C, z, dt_low, seq_idx) arrives by cp.async 16-byte copies into a double-buffered
//   raw tile while the previous tile computes (no registers held for the prefetch, no per-element loads);
// - documents (seq_idx) and the ragged last tile cost nothing in the scan loop: the prep phase stores the
//   decay argument as +inf at a document start (ex2(-inf) = 0 resets h) and (0, 0) past the end (h kept);
// - layer parameters are read in their own dtype (no host-side conversion kernels per call).
// Phases per tile (one block = one head of 16 channels of one sequence, 16*K threads):
//   S1 wait cp.async + barrier; issue next tile; store previous tile's y (16-byte stores);
//   A  convert B, C, dt_low of the tile to fp32 smem;                        barrier
//   B  prep per (channel, token): conv + silu, dt_proj + 2 b_dt + softplus, silu(z), checkpoint;  barrier
//   C  recurrence over 32 tokens (fully unrolled, branch-free), reduce-scatter over K lanes, gate -> y smem.
// The TMA kernel (v5 K = 8, 16-bit, session 11) pipelines these phases: one barrier per tile, the next tile's
// prep inside this tile's scan (see "Pipelined schedule" in the kernel).
// Bound: one ex2 per (channel, state, token) on the MUFU unit; see docs/notes/scan.md for measurements.
#pragma once
#include "../common/cuda_check.h"
#include "scan_common.cuh"
#include "scan_stage.cuh"
#include "scan_tile.cuh"
#include "../common/tma.cuh"  // the v5 K = 8 tile staging by TMA (16-bit activations, dt_rank <= 16)

#include <type_traits>

// Minimum blocks per SM of the v5 launch bounds (register cap 65536 / (threads x blocks)); compile-time knobs for
// experiments. v4: 6 (K = 4) / 3 (K = 8).
#ifndef APRIEL_SCAN_FWD5_BLOCKS_K4
#define APRIEL_SCAN_FWD5_BLOCKS_K4 8
#endif
#ifndef APRIEL_SCAN_FWD5_BLOCKS_K8
#define APRIEL_SCAN_FWD5_BLOCKS_K8 4
#endif

namespace apriel {
namespace scan4 {

using scan::from_f;
using scan::kChunk;
using scan::kLog2e;
using ::apriel::kLn2;
using ::apriel::lg2_ftz;
using scan::kN;
using scan::to_f;

using scan::ld_param;

// kVec = 16 / sizeof(T) elements at src (16-byte aligned) -> fp32 at dst (16-byte aligned).
template <typename T>
__device__ __forceinline__ void cvt_vec(const T* src, float* dst) {
  constexpr int kVec = 16 / sizeof(T);
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; i += 4)
    *reinterpret_cast<float4*>(dst + i) = make_float4(to_f(e[i]), to_f(e[i + 1]), to_f(e[i + 2]), to_f(e[i + 3]));
}

// kVec values of B or C (states c .. c+kVec-1) -> fp32 into a BC row: lane group g = n / NS holds
// [B(g*NS .. g*NS+NS-1), C(...)] so a scan lane reads its B and C with one (NS = 2) or two (NS = 4) 16-byte loads.
template <typename T, int NS>
__device__ __forceinline__ void cvt_bc(const T* src, float* row, int c, int off) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(kVec % NS == 0 && (NS == 2 || NS == 4), "state groups");
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; i += NS) {
    float* dst = row + ((c + i) / NS) * 2 * NS + off;
    if constexpr (NS == 4) *reinterpret_cast<float4*>(dst) = make_float4(to_f(e[i]), to_f(e[i + 1]), to_f(e[i + 2]), to_f(e[i + 3]));
    else *reinterpret_cast<float2*>(dst) = make_float2(to_f(e[i]), to_f(e[i + 1]));
  }
}

// Bank-conflict avoidance (ncu: 37% of the shared wavefronts were conflicts):
// - xf and dtp rows are read by a warp at rows r and r + TPT (two prep token blocks): row r lives at
//   r + (r >> log2 TPT), which puts those two rows 16 banks apart;
// - ug rows are read by the gate at K consecutive tokens (interleaved reduce-scatter): padded to 20 (K = 4) or
//   18 (K = 8) float2 so the K rows of a half-warp fall in disjoint banks.
template <int TPT> __device__ __forceinline__ int skew_row(int r) { return r + (r >> (TPT == 8 ? 3 : TPT == 4 ? 2 : 1)); }

template <typename T, int kR, int K>
struct Smem4 {
  static constexpr int kSkewRows = kChunk + 3 + (kChunk + 3) / 2 + 1;  // enough rows for any TPT >= 2
  static constexpr int kUgStride = K == 4 ? 20 : 18;
  RawTile<T, kR> raw[2];
  alignas(16) float xf[2][kSkewRows][kN];   // conv input (fp32) by tile parity; rows 0..2 = the 3 positions before
  alignas(16) int seqf[2][kChunk + 3];      // document ids on the rows of xf (unskewed; seq_idx only)
  alignas(16) float BC[kChunk][2 * kN];     // per token, per state group of a lane: its NS B values, then its NS C
  alignas(16) float dtp[kSkewRows][kN];     // dt_low . W_dt per (token, channel), 16-bit types (tensor cores)
  alignas(16) float2 ud[1][kChunk][kN];     // (decay argument, delta * u) per (token, channel)
  alignas(16) float2 ug[1][kChunk][kUgStride];  // (u, silu(z)) per (token, channel)
  alignas(16) T y[2][kChunk][kN];           // gated output by tile parity (stored at the next tile's start)
};

// v5 layout: the same arrays sized for what the instantiation uses, so more blocks fit per SM (the v4 layout is
// 35.5 KB for bf16 K = 4, 6 blocks per SM; this one 27.5 KB, 8 blocks): no fp32 B/C copies when the scan reads the raw tile, no document ids
// without seq_idx, no dt_proj tile for fp32 activations, skewed rows counted for this TPT, and ONE y buffer
// (y of tile i is written after S3 of tile i and read between S1 and S2 of tile i + 1: never both at once).
// kPipe (the pipelined v5 K = 8 TMA kernel, session 11): three raw tiles and two (ud, ug) item buffers, so tile
// i + 1's prep runs inside tile i's scan (see the kernel).
template <int TPT> constexpr int skew_rows(int rows) { return rows - 1 + (rows - 1) / TPT + 1; }
template <typename T, int kR, int K, bool kSeq, bool kRawBC, bool kPipe = false>
struct Smem5 {
  static constexpr int TPT = kChunk * kN / (kN * K);
  static constexpr int kUgStride = K == 4 ? 20 : 18;
  static constexpr bool kMma = sizeof(T) == 2;
  static constexpr int kRaws = kPipe ? 3 : 2, kItemBufs = kPipe ? 2 : 1;
  RawTile<T, kR> raw[kRaws];
  alignas(16) float xf[2][skew_rows<TPT>(kChunk + 3)][kN];
  alignas(16) int seqf[2][kSeq ? kChunk + 3 : 1];
  alignas(16) float BC[kRawBC ? 1 : kChunk][2 * kN];
  alignas(16) float dtp[kMma ? skew_rows<TPT>(kChunk) : 1][kN];
  alignas(16) float2 ud[kItemBufs][kChunk][kN];
  alignas(16) float2 ug[kItemBufs][kChunk][kUgStride];
  // kPipe: y by tile parity (no barrier separates tile i's gate from the reads of tile i - 1's y)
  alignas(16) T y[kPipe ? 2 : 1][kChunk][kN];
};
template <typename T, int kR, int K, bool kSeq, bool kRawBC, int kVer, bool kPipe = false>
using SmemFor = std::conditional_t<kVer >= 5, Smem5<T, kR, K, kSeq, kRawBC, kPipe>, Smem4<T, kR, K>>;
// The TMA variant appends the transaction barriers of the raw tiles (the cp.async layouts stay byte for byte as
// they were: K = 4's 8 blocks per SM have no room for 16 more bytes).
template <typename Base, int kRaws>
struct WithTmaBarriers : Base {
  alignas(8) uint64_t tma_bar[kRaws];
};
// kTma: the TMA kernel (v5 K = 8) runs the pipelined schedule (3 raw tiles).
template <typename T, int kR, int K, bool kSeq, bool kRawBC, int kVer, bool kTma>
using SmemForT = std::conditional_t<kTma, WithTmaBarriers<SmemFor<T, kR, K, kSeq, kRawBC, kVer, true>, 3>,
                                    SmemFor<T, kR, K, kSeq, kRawBC, kVer>>;

// Tensor maps of p's zxbc and dt_low for the TMA staging of the forwards (v5 K = 8 here, v7) and the backward v7;
// false where TMA cannot run here (tma::usable) or the rows do not allow it (the cp.async kernels run then).
// Internal linkage: tma::usable differs between TMA and non-TMA TUs (tma.cuh).
namespace {
inline bool encode_scan_maps(const MixerScanParams& p, tma::ScanMaps& maps) {
  return p.zxbc_vec16 && p.dt_vec16 && tma::usable() &&
         tma::encode_rows16(&maps.zxbc, p.zxbc, p.batch, p.seqlen, 2 * (int64_t)p.d_inner + 2 * p.d_xb,
                            p.zxbc_row_stride, p.zxbc_batch_stride) &&
         tma::encode_rows16(&maps.dt, p.dt_low, p.batch, p.seqlen, p.dt_rank, p.dt_row_stride, p.dt_batch_stride);
}
}  // namespace

// The tile by the bulk tensor copy engine (kTma; v5, 16-bit activations, dt_rank <= 16, documents too): thread 0
// arms raw's barrier and copies x, B, C, z and dt_low (one box of 16 columns x 32 rows each; the engine zero-fills
// rows past the sequence end and dt columns past dt_rank). See tma.cuh and the forward v7's stage_tma.
template <typename T, int kR>
__device__ __forceinline__ void stage_tma(const MixerScanParams& p, const tma::ScanMaps& maps, RawTile<T, kR>& r,
                                          uint64_t* bar, int b, int head, int group, int t0) {
  static_assert(sizeof(T) == 2 && kR == kN && tma::kBoxCols == kN && tma::kBoxRows == kChunk, "16-bit boxes");
  using Raw = RawTile<T, kR>;
  static_assert(offsetof(Raw, dt) == 4 * kChunk * kN * sizeof(T) && sizeof(Raw) % 128 == 0,
                "5 boxes at 1 KB steps, raw[1] 128-byte aligned");
  tma::expect_bytes(bar, 5 * kChunk * kN * sizeof(T));
  const int col_x = p.d_inner + group * kN;
  tma::load_box(maps.zxbc, bar, &r.x[0][0], col_x, t0, b);
  tma::load_box(maps.zxbc, bar, &r.B[0][0], col_x + p.d_xb, t0, b);
  tma::load_box(maps.zxbc, bar, &r.C[0][0], p.d_inner + 2 * p.d_xb + head * kN, t0, b);
  tma::load_box(maps.zxbc, bar, &r.z[0][0], head * kN, t0, b);
  tma::load_box(maps.dt, bar, &r.dt[0][0], 0, t0, b);
}

// softplus_fast (../common/scan_math.cuh) with the same operations and the same result, but both branches
// computed and chosen by selp: nvcc compiled the nested ternary into a divergent branch per token (BSSY / BRA /
// BSYNC plus moves, ~5 instructions and a reconvergence per (channel, token) of the prep).
__device__ __forceinline__ float softplus_select(float v) {
  const float e = ex2(kLog2e * v);
  const float small = e * (1.f - e * (0.5f - e * (1.f / 3.f - e * 0.25f)));
  const float big = lg2_ftz(1.f + e) * kLn2;
  float r;
  // (the intermediate goes to a local register: %0 may share a register with an input)
  asm("{\n .reg .pred ps, pb;\n .reg .f32 lo;\n setp.lt.f32 ps, %2, 0f3C23D70A;\n setp.gt.f32 pb, %3, 0f41A00000;\n"
      " selp.f32 lo, %1, %4, ps;\n selp.f32 %0, %3, lo, pb;\n}"
      : "=f"(r) : "f"(small), "f"(e), "f"(v), "f"(big));  // 0f3C23D70A = 1e-2f, 0f41A00000 = 20.f
  return r;
}

// 4 values at src -> fp32 float4 at dst (16-byte aligned): one 8-byte (16-bit types) or 16-byte load and one
// 16-byte store per thread, consecutive across the warp (no bank conflicts, unlike 8-value pieces).
template <typename T>
__device__ __forceinline__ void cvt4(const T* src, float* dst) {
  if constexpr (sizeof(T) == 2) {
    const uint2 w = *reinterpret_cast<const uint2*>(src);
    const T* e = reinterpret_cast<const T*>(&w);
    *reinterpret_cast<float4*>(dst) = make_float4(to_f(e[0]), to_f(e[1]), to_f(e[2]), to_f(e[3]));
  } else {
    *reinterpret_cast<float4*>(dst) = *reinterpret_cast<const float4*>(src);
  }
}

// Sum of acc[t] over the K lanes of a channel, scattered by token parity: lane j ends with the totals of tokens
// K*i + bitrev(j) in acc[i] (i < kChunk / K). Same shuffle count as the contiguous split, but the K lanes of a
// channel then gate K consecutive tokens, which keeps the gate's shared-memory rows conflict-free.
// (N < kChunk: the same over N consecutive tokens; N = K leaves lane j the total of token bitrev(j) in acc[0].)
template <int K, int N = kChunk>
__device__ __forceinline__ int reduce_scatter_interleaved(float (&acc)[N], int j) {
  int len = N, sigma = 0, bit = 1;
#pragma unroll
  for (int off = K / 2; off >= 1; off >>= 1) {
    const bool upper = (j & off) != 0;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      if (i < len / 2) {
        const float send = upper ? acc[2 * i] : acc[2 * i + 1];
        const float keep = upper ? acc[2 * i + 1] : acc[2 * i];
        acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
      }
    }
    if (upper) sigma += bit;
    bit <<= 1;
    len /= 2;
  }
  return sigma;  // this lane's tokens: K * i + sigma
}

// dt_proj of a tile on tensor cores (16-bit activations): D[t][c] = sum_k dt_low[t][k] W[c][k], fp32 accumulate.
// m16n8k16: A = dt_low rows (row-major, from the raw tile), B = W^T (registers, loaded once per block).
template <typename T> struct MmaOp;
template <> struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&v);
  }
};
template <> struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&v);
  }
};

// A fragment of the dt_proj mma: m16 tile m of raw tile r's dt_low rows, k-step ks; columns >= R were never copied:
// read as zero (NaN garbage times a zero weight is still NaN).
template <typename T, int kR>
__device__ __forceinline__ void dt_a_fragment(const RawTile<T, kR>& r, int m, int ks, int lane, int R, unsigned (&a)[4]) {
  const int g = lane / 4, q = lane % 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = m * 16 + g + (i & 1) * 8, k = ks * 16 + (i >> 1) * 8 + 2 * q;
    a[i] = k < R ? *reinterpret_cast<const unsigned*>(&r.dt[row][k]) : 0u;
  }
}

// d = dt_proj of (m16 tile m of the tile's tokens) x (n8 tile n of the head's channels): A = raw tile r's dt_low
// rows, B = W_dt fragments wb[n] (registers, loaded once per block).
template <typename T, int kR>
__device__ __forceinline__ void dt_tile_mma(const RawTile<T, kR>& r, const unsigned (&wb)[2][kR / 16][2], int m, int n,
                                            int lane, int R, float (&d)[4]) {
  d[0] = d[1] = d[2] = d[3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < kR / 16; ++ks) {
    unsigned a[4];
    dt_a_fragment(r, m, ks, lane, R, a);
    const unsigned bf[2] = {n ? wb[1][ks][0] : wb[0][ks][0], n ? wb[1][ks][1] : wb[0][ks][1]};
    MmaOp<T>::run(d, a, bf);
  }
}

// Document ids of the tile starting at t0 into dst (threads 0..kChunk-1, 4-byte cp.async; past the end: the last
// id, those tokens are inert).
__device__ __forceinline__ void stage_seq(const MixerScanParams& p, int* dst, int b, int t0, int tid) {
  if (tid < kChunk) cp_async4(&dst[tid], p.seq_idx + (int64_t)b * p.seqlen + min(t0 + tid, p.seqlen - 1));
}

// Issues the copies of the tile starting at t0 into r (16-byte cp.async when the host found the rows
// aligned, plain loads otherwise; scan_stage.cuh). Rows past the sequence end are zero-filled.
template <typename T, int NT, int kR>
__device__ __forceinline__ void stage(const MixerScanParams& p, RawTile<T, kR>& r, int b, int head, int group,
                                      int t0) {
  const int tid = threadIdx.x;
  const T* zx = static_cast<const T*>(p.zxbc) + (int64_t)b * p.zxbc_batch_stride;
  const int col_x = p.d_inner + group * kN, col_B = p.d_inner + p.d_xb + group * kN;
  const int col_C = p.d_inner + 2 * p.d_xb + head * kN, col_z = head * kN;
  if (p.zxbc_vec16) stage_zxbc_vec16<T, NT, kR>(p, r, zx, tid, col_x, col_B, col_C, col_z, t0);
  else stage_zxbc_plain<T, NT, kR>(p, r, zx, tid, col_x, col_B, col_C, col_z, t0);
  stage_dt<T, NT, kR>(p, r, b, tid, t0);
  if (p.seq_idx != nullptr) stage_seq(p, r.seq, b, t0, tid);
}

// Unpacks two 16-bit values of a 32-bit word to fp32 (bf16: bit moves; fp16: conversions).
template <typename T> __device__ __forceinline__ float2 unpack2(unsigned w);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(unsigned w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
template <> __device__ __forceinline__ float2 unpack2<__half>(unsigned w) {
  return __half22float2(*reinterpret_cast<const __half2*>(&w));
}
template <> __device__ __forceinline__ float2 unpack2<float>(unsigned) { return make_float2(0.f, 0.f); }

// kRawBC (16-bit activations only): the scan reads B and C straight from the raw tile (8 B per 4 values, not
// 16 B of fp32): the forward is bound by shared-memory wavefronts, and these loads are most of them.
// kVer 5 (APRIEL_SCAN_FWD=v5*): the same algorithm and results (bitwise) with a smaller shared-memory layout
// (Smem5), more blocks per SM (launch bounds kMinBlocks5), a branch-free softplus and compile-time loop counts.
// The v5 residency targets hold for the default shapes (16-bit activations, dt_rank <= 16: 27.5 KB of shared
// memory, <= 128 registers without spills). dt_rank 32 (+2 KB, 16 more live registers for the mma fragments) and
// fp32 activations (41 KB: 5 blocks per SM at most; the CUDA-core dt dot keeps W_dt in registers) keep v4's
// targets: asking for more spilled 28-88 bytes.
template <typename T, int K, int kR>
constexpr int kMinBlocks5 = (sizeof(T) == 2 && kR == 16) ? (K == 4 ? APRIEL_SCAN_FWD5_BLOCKS_K4 : APRIEL_SCAN_FWD5_BLOCKS_K8)
                                                         : (K == 4 ? 6 : 3);
template <typename T, int K, int kR, int kVer> constexpr int kMinBlocks = kVer >= 5 ? kMinBlocks5<T, K, kR> : (K == 4 ? 6 : 3);
#ifndef APRIEL_SCAN_FWD_PF
#define APRIEL_SCAN_FWD_PF 2  // experiments: NVCC_APPEND_FLAGS=-DAPRIEL_SCAN_FWD_PF=4 at build time
#endif
// The pipelined TMA kernel's own operand prefetch and recurrence front distances in tokens (session 12 A/B, b1
// L8192 graph p50: whole-tile reduce-scatter 2 / 2 0.389 ms; per-quarter sums 2 / 2 0.424, 3 / 2 0.393, 4 / 3
// 0.380, 5 / 4 0.378, 6 / 5 0.381).
#ifndef APRIEL_SCAN_FWD5T_PF
#define APRIEL_SCAN_FWD5T_PF 5
#endif
#ifndef APRIEL_SCAN_FWD5T_FRONT
#define APRIEL_SCAN_FWD5T_FRONT 4
#endif

// kTma (v5 K = 8 only, see launch): the tiles arrive by TMA (stage_tma) instead of cp.async; the rest is the same code.
// kSubCk (session 31, 16-bit v5): also the sub-chunk checkpoints p.ckpt_sub (the states after tokens 7, 15, 23 of
// every tile) and their flag, as the v7 forward's kSubCk writes them (APRIEL_SCAN_CKPT=sub): the v7 backward then skips
// its pass A at batch 1-3 too (with packed documents: where the varlen plan leaves the call to v5). A template flag: a
// runtime branch in the unrolled scan moves ptxas's schedule of the kernel without them (session 30).
template <typename T, int K, int kR, bool kSeq, bool kRawBC, int kVer = 4, bool kTma = false, bool kSubCk = false>
__global__ void __launch_bounds__(kN * K, (kMinBlocks<T, K, kR, kVer>))
    mixer_scan_fwd4_kernel(MixerScanParams p, const __grid_constant__ tma::ScanMaps maps) {
  constexpr int NT = kN * K;                 // threads per block
  constexpr int NS = kN / K;                 // states per thread
  constexpr int TPT = kChunk * kN / NT;      // prep tokens per thread
  constexpr int kVec = 16 / sizeof(T), kCPR = kN / kVec;
  constexpr bool kMma = sizeof(T) == 2;      // dt_proj on tensor cores for 16-bit activations
  constexpr int kKSteps = kR / 16;
  static_assert(TPT >= 1 && kChunk % TPT == 0 && NT >= 64, "prep mapping; the halo and final-state steps use 48 threads");
  extern __shared__ __align__(128) unsigned char smem_raw[];  // 128: TMA destinations
  using SM = SmemForT<T, kR, K, kSeq, kRawBC, kVer, kTma>;
  constexpr bool kPipe = kTma;  // the TMA kernel's schedule: see "Pipelined schedule" below
  SM& sm = *reinterpret_cast<SM*>(smem_raw);
  constexpr bool kV5 = kVer >= 5;
  // v5's prep diet (per-thread column pointers, branch-free softplus): 16-bit activations only. fp32 sits at the
  // register cap (W_dt in registers for the CUDA-core dot): the 3 pointers and both live softplus branches spilled
  // 24 more bytes there.
  constexpr bool kV5Diet = kV5 && sizeof(T) == 2;
  static_assert(!kSubCk || kV5Diet, "sub-chunk checkpoints: the 16-bit v5 kernels");
  // Packed documents: the varlen plan (mixer_scan_plan.cu) chose the varlen v7 kernel for this call, which does the work.
  if constexpr (kSeq) {
    if (p.fwd_skip != nullptr && *p.fwd_skip != 0) return;
  }
  const int head = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int group = head / p.heads_per_group, c0 = head * kN;
  const int D = p.d_inner, L = p.seqlen, R = p.dt_rank, W = p.width;
  const int n_tiles = p.n_chunks;

  if constexpr (kTma) {
    if (tid == 0) {
      tma::init_barriers(sm.tma_bar);
      stage_tma<T, kR>(p, maps, sm.raw[0], &sm.tma_bar[0], b, head, group, 0);
      if (kPipe && n_tiles > 1) stage_tma<T, kR>(p, maps, sm.raw[1], &sm.tma_bar[1], b, head, group, kChunk);
    }
  } else {
    stage<T, NT, kR>(p, sm.raw[0], b, head, group, 0);
    cp_async_commit();
  }

  // Prep mapping: channel pch, tokens pq*TPT .. pq*TPT+TPT-1 of each tile. Its constants live in registers.
  const int pch = tid % kN, pq = tid / kN, pc = c0 + pch;
  const int wch = p.repeat_before_conv ? pc : group * kN + pch;
  float w[4];  // right-aligned taps: w[3] multiplies the current token for every width
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int src = i - (4 - W);
    w[i] = src >= 0 ? ld_param(p.conv_w_raw, (int64_t)wch * W + src) : 0.f;
  }
  const float cb = p.conv_b_raw.ptr != nullptr ? ld_param(p.conv_b_raw, wch) : 0.f;
  const float dtb2 = 2.f * ld_param(p.dt_b_raw, pc);  // dt_proj's bias and delta_bias: the same vector twice
  // W_dt: fp32 rows for the CUDA-core dot (fp32 activations) or B fragments of the mma (16-bit activations).
  float wd[kMma ? 1 : kR];
  unsigned wb[2][kKSteps][2];
  if constexpr (kMma) {
    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int k = ks * 16 + hf * 8 + 2 * q;
          const int64_t row = (int64_t)(c0 + n * 8 + g) * R;
          wb[n][ks][hf] = MmaOp<T>::pack(k < R ? ld_param(p.dt_w_raw, row + k) : 0.f,
                                         k + 1 < R ? ld_param(p.dt_w_raw, row + k + 1) : 0.f);
        }
  } else {
#pragma unroll
    for (int i = 0; i < kR; ++i) wd[i] = i < R ? ld_param(p.dt_w_raw, (int64_t)pc * R + i) : 0.f;
  }

  // Scan mapping: channel sch, states j*NS .. j*NS+NS-1.
  const int sch = tid / K, j = tid % K, cs = c0 + sch;
  float A2[NS], h[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const int n = j * NS + s;
    A2[s] = -__expf(ld_param(p.A_log_raw, (int64_t)cs * kN + n)) * kLog2e;
    h[s] = p.init_ssm != nullptr ? p.init_ssm[((int64_t)b * D + cs) * kN + n] : 0.f;
  }
  const float Dc = ld_param(p.D_raw, cs);

  // Tile 0 copies its halo from rows kChunk.. of parity 1: put the initial conv state (compact X layout,
  // fp32) there; it counts as part of the first document.
  if (tid < 3 * kN) {
    const int k = tid / kN, ch = tid % kN, kk = (W - 1) + (k - 3);
    sm.xf[1][skew_row<TPT>(kChunk + k)][ch] = (p.init_conv != nullptr && kk >= 0)
                                   ? p.init_conv[((int64_t)b * p.d_xb + group * kN + ch) * (W - 1) + kk] : 0.f;
  }
  if (kSeq && !kPipe && tid < 3) sm.seqf[1][kChunk + tid] = p.seq_idx[(int64_t)b * L];

  T* y = static_cast<T*>(p.y) + (int64_t)b * L * D;
  // The phases of a tile as lambdas: the default schedule and the pipelined one (kPipe) run the same code.
  // Previous tile's y rows from y buffer ypar (always full: only the last tile is ragged).
  auto store_y = [&](int t0_prev, int ypar) {
    if constexpr (kV5) {  // compile-time trip count (v4's runtime loop compiled to ~80 instructions)
      constexpr int kPieces = kChunk * kCPR;
#pragma unroll
      for (int k = 0; k < (kPieces + NT - 1) / NT; ++k) {
        const int i = tid + k * NT;
        if (kPieces % NT == 0 || i < kPieces) {
          const int row = i / kCPR, part = i % kCPR;
          *reinterpret_cast<uint4*>(y + (int64_t)(t0_prev + row) * D + c0 + part * kVec) =
              *reinterpret_cast<const uint4*>(&sm.y[kPipe ? ypar : 0][row][part * kVec]);
        }
      }
    } else {
      for (int i = tid; i < kChunk * kCPR; i += NT) {
        const int row = i / kCPR, part = i % kCPR;
        *reinterpret_cast<uint4*>(y + (int64_t)(t0_prev + row) * D + c0 + part * kVec) =
            *reinterpret_cast<const uint4*>(&sm.y[ypar][row][part * kVec]);
      }
    }
  };
  // A: fp32 copies of what many threads read: x (conv input, after the 3 halo rows carried from the previous
  // tile's parity), B and C (every scan lane); document ids; dt_proj by mma for 16-bit activations.
  auto phase_a = [&](const RawTile<T, kR>& r, int par) {
    constexpr int kPieces = kChunk * kN / kVec;  // 16-byte pieces of x, of B and of C
    constexpr int kQuads = kChunk * kN / 4;  // 4-value pieces of x
#pragma unroll
    for (int k = 0; k < (kQuads + NT - 1) / NT; ++k) {
      const int q4 = tid + k * NT;
      if (kQuads % NT == 0 || q4 < kQuads)
        cvt4<T>(&r.x[0][0] + q4 * 4, &sm.xf[par][skew_row<TPT>(3 + q4 / 4)][(q4 % 4) * 4]);
    }
#pragma unroll
    for (int which = 1; which < (kRawBC ? 1 : 3); ++which) {
      const T* src = which == 1 ? &r.B[0][0] : &r.C[0][0];
#pragma unroll
      for (int k = 0; k < (kPieces + NT - 1) / NT; ++k) {
        const int e = (tid + k * NT) * kVec;
        if (kPieces % NT == 0 || tid + k * NT < kPieces)
          cvt_bc<T, NS>(src + e, &sm.BC[e / kN][0], e % kN, which == 1 ? 0 : NS);
      }
    }
    if (tid < 3 * kN / 4) {  // halo rows: float4 copies of the previous tile's last 3 rows
      const int row = tid / 4, part = tid % 4;
      *reinterpret_cast<float4*>(&sm.xf[par][skew_row<TPT>(row)][part * 4]) =
          *reinterpret_cast<const float4*>(&sm.xf[par ^ 1][skew_row<TPT>(kChunk + row)][part * 4]);
    }
    if constexpr (kSeq && !kPipe) {  // (the pipelined kernel: document ids as a bit mask, doc_bits below)
      if (tid < kChunk) sm.seqf[par][3 + tid] = r.seq[tid];
      else if (tid < kChunk + 3) sm.seqf[par][tid - kChunk] = sm.seqf[par ^ 1][tid];
    }
    if constexpr (kMma) {
      const int g = lane / 4, q = lane % 4;
      constexpr int kWarps = NT / 32;
#pragma unroll
      for (int pi = 0; pi < (4 + kWarps - 1) / kWarps; ++pi) {  // (m-tile, n-tile) pairs of the 32 x 16 output
        const int pair = warp + pi * kWarps;
        if (pair >= 4) break;
        const int m = pair & 1, n = pair >> 1;
        float d[4];
        dt_tile_mma(r, wb, m, n, lane, R, d);
        *reinterpret_cast<float2*>(&sm.dtp[skew_row<TPT>(m * 16 + g)][n * 8 + 2 * q]) = make_float2(d[0], d[1]);
        *reinterpret_cast<float2*>(&sm.dtp[skew_row<TPT>(m * 16 + g + 8)][n * 8 + 2 * q]) = make_float2(d[2], d[3]);
      }
    }
  };

  // B: prep of TPT consecutive tokens of channel pch (xf row i+3 holds token i): prep_load reads the conv inputs
  // (and document ids) of xf parity par, prep_item(i) computes token tb + i's items into the (ud, ug) buffer ub.
  const int tb = pq * TPT;
  // skew_row(tb + k) = tb + pq + k + (k >> log2 TPT): one runtime base, compile-time offsets
  constexpr int kShift = TPT == 8 ? 3 : TPT == 4 ? 2 : 1;
  auto prep_load = [&](int par, float (&xw)[TPT + 3], int (&sw)[TPT + 3]) {
    const float* xrow = &sm.xf[par][tb + pq][pch];
#pragma unroll
    for (int k = 0; k < TPT + 3; ++k) {
      xw[k] = xrow[(k + (k >> kShift)) * kN];
      sw[k] = kSeq && !kPipe ? sm.seqf[par][tb + k] : 0;
    }
  };
  // Token tb + i's conv taps inside its document and keep = same document as the token before (kSeq). sw: the
  // staged ids of rows tb .. tb + TPT + 2 (cp.async kernels), or in the pipelined kernel the start mask's rows
  // tb + 1 .. tb + 32 in sw[0] (bit j = a start at row tb + 1 + j; doc_bits), tested by scan::doc_taps as in v7.
  auto item_taps = [&](const int (&sw)[TPT + 3], int i, bool docs, bool (&tap)[4], bool& keep) {
    tap[0] = tap[1] = tap[2] = tap[3] = keep = true;
    if (!kSeq || !docs) return;
    if constexpr (kPipe) {
      scan::doc_taps((unsigned)sw[0] >> i, tap, keep);
    } else {
#pragma unroll
      for (int k = 0; k < 3; ++k) tap[k] = sw[i + k] == sw[i + 3];
      keep = tap[2];
    }
  };
  // tv: the tile's valid tokens (items past it are (0, 0): h kept).
  // docs false: no document start among the rows (the prep skips the tests; a constant at every call)
  auto prep_item = [&](int i, const RawTile<T, kR>& r, int ub, int tv, const float (&xw)[TPT + 3],
                       const int (&sw)[TPT + 3], bool docs) {
    const float* drow = &sm.dtp[tb + pq][pch];
    // v5: per-thread column bases, so each token's z load and ud / ug stores are one instruction with a
    // compile-time offset (v4 recomputed the tile-parity row address per token: 3-4 IMADs).
    const T* zcol = &r.z[tb][pch];
    float2* udcol = &sm.ud[ub][tb][pch];
    float2* ugcol = &sm.ug[ub][tb][pch];
    const int t = tb + i;
    bool tap[4], keep;
    item_taps(sw, i, docs, tap, keep);
    float cv = cb;
#pragma unroll
    for (int k = 0; k < 4; ++k) cv = fmaf(w[k], tap[k] ? xw[i + k] : 0.f, cv);
    const float u = cv * sigmoid_fast(cv);
    float dp = dtb2;
    if constexpr (kMma) {
      dp += drow[i * kN];  // i < TPT: no skew step inside the block
    } else {
      const float* dtrow = reinterpret_cast<const float*>(&r.dt[t][0]);
#pragma unroll
      for (int c = 0; c < kR; c += 4) {
        if (c < R) {  // uniform; the weights past R are zero, and so must the staged columns be read
          const float4 v = *reinterpret_cast<const float4*>(dtrow + c);
          dp = fmaf(wd[c], c < R ? v.x : 0.f,
                    fmaf(wd[c + 1], c + 1 < R ? v.y : 0.f,
                         fmaf(wd[c + 2], c + 2 < R ? v.z : 0.f, fmaf(wd[c + 3], c + 3 < R ? v.w : 0.f, dp))));
        }
      }
    }
    const float delta = kV5Diet ? softplus_select(dp) : softplus_fast(dp);
    if constexpr (kV5Diet) {
      const float zz = to_f(zcol[i * kN]);
      udcol[i * kN] = t < tv ? make_float2(keep ? delta : __int_as_float(0x7f800000), delta * u)
                             : make_float2(0.f, 0.f);
      ugcol[i * SM::kUgStride] = make_float2(u, zz * sigmoid_fast(zz));
    } else {
      const float zz = to_f(r.z[t][pch]);
      sm.ud[ub][t][pch] = t < tv ? make_float2(keep ? delta : __int_as_float(0x7f800000), delta * u)
                                 : make_float2(0.f, 0.f);
      sm.ug[ub][t][pch] = make_float2(u, zz * sigmoid_fast(zz));
    }
  };

  // The pipelined kernel's readout sum of K consecutive tokens (quarter qt of the tile) over the channel's K lanes
  // and its gate: the same shuffle tree and the same token per lane (K qt + bitrev(j)) as the whole-tile
  // reduce-scatter, so bitwise the same y; placed between the next quarter's tokens, where the scan's ex2 / FFMA
  // stream hides the shuffles' latency, it leaves one quarter's reduce-scatter at the end of the tile, and the
  // tile's 32 readouts are no longer live at once (128 -> ~93 registers). Alone it was 8 % slower (ptxas scheduled
  // the freed registers worse); with a deeper operand prefetch and front (5 / 4 tokens) 2-3 % faster at b1
  // (session 12, docs/notes/scan.md).
  constexpr bool kQuarterRed = kPipe;
  auto gate_quarter = [&](const float (&acc)[kChunk], int qt, int ub, int ypar) {
    float v[K];
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = acc[K * qt + i];
    const int t = K * qt + reduce_scatter_interleaved<K, K>(v, j);
    const float2 q = sm.ug[ub][t][sch];
    sm.y[ypar][t][sch] = from_f<T>((v[0] + Dc * q.x) * q.y);
  };

  // C: the recurrence over the tile of raw r with the items of buffer ub, then the gate into y buffer ypar.
  // Fully unrolled and branch-free: the ex2 of later tokens overlap the h chain; the shared-memory operands are
  // loaded kPF tokens ahead (short-scoreboard stalls were the top stall reason). hook(t) runs after token t's
  // front (the pipelined schedule puts the next tile's prep items there).
  auto scan_tile = [&](const RawTile<T, kR>& r, int ub, int ypar, auto&& hook) {
    // operand prefetch distance in tokens (compile-time knobs: 5 for the pipelined TMA kernel, 2 elsewhere)
    constexpr int kPF = kPipe ? APRIEL_SCAN_FWD5T_PF : APRIEL_SCAN_FWD_PF;
    constexpr int kW = kRawBC ? NS : 2 * NS;  // 32-bit words of B and C per token and lane
    float acc[kChunk];
    float2 ep[kPF + 1];
    unsigned bcp[kPF + 1][kW];
    auto load_bc = [&](int t, unsigned (&dst)[kW]) {
      if constexpr (kRawBC) {  // NS/2 words of B, then NS/2 of C (16-bit pairs)
        const unsigned* bw = reinterpret_cast<const unsigned*>(&r.B[t][j * NS]);
        const unsigned* cw = reinterpret_cast<const unsigned*>(&r.C[t][j * NS]);
        if constexpr (NS == 4) {
          const uint2 b2 = *reinterpret_cast<const uint2*>(bw), c2 = *reinterpret_cast<const uint2*>(cw);
          dst[0] = b2.x; dst[1] = b2.y; dst[2] = c2.x; dst[3] = c2.y;
        } else {
          dst[0] = bw[0]; dst[1] = cw[0];
        }
      } else {
        float v[2 * NS];
        scan::load_states<2 * NS>(&sm.BC[t][j * 2 * NS], v);
#pragma unroll
        for (int i = 0; i < 2 * NS; ++i) dst[i] = __float_as_uint(v[i]);
      }
    };
#pragma unroll
    for (int t = 0; t < kPF; ++t) {
      ep[t] = sm.ud[ub][t][sch];
      load_bc(t, bcp[t]);
    }
    // front(t): token t's decays ex2(delta A2) and input products delta u B (none depends on h), kFront tokens
    // ahead of their use (0: in the token's own step). Only the order of the instructions changes, not the
    // arithmetic (v4 and v5 stay bitwise equal). Session 8 (bench/results/s8/fwd_front/, graph p50 at b1 L8192 /
    // L32768): v5 K = 8 0.474 / 1.869 ms at 0 -> 0.467 / 1.836 at 2 tokens ahead (1: 0.472 / 1.857); v4 K = 8 was
    // flat or slower (0.475 -> 0.481 at 2), so v4 keeps 0 and the 16-bit K = 8 default moved to v5.
    constexpr int kFront = kPipe ? APRIEL_SCAN_FWD5T_FRONT : kV5 ? 2 : 0;
    static_assert(kFront >= 0 && kFront < kPF + 1, "the front reads operands the prefetch ring still holds");
    float fdA[kFront + 1][NS], fdB[kFront + 1][NS];
    auto unpack_bc = [&](int t, float (&Bv)[NS], float (&Cv)[NS]) {
      if constexpr (kRawBC) {
#pragma unroll
        for (int i = 0; i < NS / 2; ++i) {
          const float2 bb = unpack2<T>(bcp[t % (kPF + 1)][i]), cc = unpack2<T>(bcp[t % (kPF + 1)][NS / 2 + i]);
          Bv[2 * i] = bb.x; Bv[2 * i + 1] = bb.y; Cv[2 * i] = cc.x; Cv[2 * i + 1] = cc.y;
        }
      } else {
#pragma unroll
        for (int s = 0; s < NS; ++s) {
          Bv[s] = __uint_as_float(bcp[t % (kPF + 1)][s]);
          Cv[s] = __uint_as_float(bcp[t % (kPF + 1)][NS + s]);
        }
      }
    };
    auto front = [&](int t) {
      const float2 e = ep[t % (kPF + 1)];
      float Bv[NS], Cv[NS];
      unpack_bc(t, Bv, Cv);
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        fdA[t % (kFront + 1)][s] = ex2(e.x * A2[s]);
        fdB[t % (kFront + 1)][s] = e.y * Bv[s];
      }
    };
#pragma unroll
    for (int t = 0; t < kFront; ++t) front(t);
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      if (t + kPF < kChunk) {
        ep[(t + kPF) % (kPF + 1)] = sm.ud[ub][t + kPF][sch];
        load_bc(t + kPF, bcp[(t + kPF) % (kPF + 1)]);
      }
      if (t + kFront < kChunk) front(t + kFront);
      hook(t);
      float Bv[NS], Cv[NS];
      unpack_bc(t, Bv, Cv);
      float a = 0.f;
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        h[s] = fmaf(fdA[t % (kFront + 1)][s], h[s], fdB[t % (kFront + 1)][s]);
        a = fmaf(Cv[s], h[s], a);
      }
      acc[t] = a;
      // kQuarterRed: quarter q's sum and gate two tokens into quarter q + 1, off the tile's tail
      if (kQuarterRed && t % K == 1 && t > K) gate_quarter(acc, t / K - 1, ub, ypar);
    }
    if constexpr (kQuarterRed) {
      gate_quarter(acc, kChunk / K - 1, ub, ypar);
    } else {
      const int sigma = reduce_scatter_interleaved<K>(acc, j);
#pragma unroll
      for (int i = 0; i < kChunk / K; ++i) {
        const int t = K * i + sigma;
        const float2 q = sm.ug[ub][t][sch];
        sm.y[ypar][t][sch] = from_f<T>((acc[i] + Dc * q.x) * q.y);
      }
    }
  };
  // Phase A of the pipelined schedule, warp-local (no block barrier after it): each warp computes the dt_proj rows
  // of its own prep tokens (8 per warp: the m-tile holding them, both n-tiles; the same mma operands as phase_a,
  // so the same values) and the prep reads the conv inputs straight from the raw tiles (the 3 tokens before the
  // tile from the previous raw tile), not from xf.
  auto dt_rows_of_warp = [&](const RawTile<T, kR>& r) {
    if constexpr (kPipe) {
      static_assert(kMma && NT == 128 && TPT == 4, "warp w preps tokens 8w .. 8w + 7");
      const int g = lane / 4, q = lane % 4, m = warp >> 1, hi = warp & 1;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        float d[4];
        dt_tile_mma(r, wb, m, n, lane, R, d);
        *reinterpret_cast<float2*>(&sm.dtp[skew_row<TPT>(m * 16 + g + hi * 8)][n * 8 + 2 * q]) =
            hi ? make_float2(d[2], d[3]) : make_float2(d[0], d[1]);
      }
    }
  };
  // Conv inputs of the prep tokens from raw tile rn; tokens before it from raw tile rp's last rows.
  auto prep_load_raw = [&](const RawTile<T, kR>& rn, const RawTile<T, kR>& rp, float (&xw)[TPT + 3]) {
#pragma unroll
    for (int k = 0; k < TPT + 3; ++k) {
      const int tok = tb + k - 3;
      if (k < 3) xw[k] = to_f(*(tok >= 0 ? &rn.x[tok][pch] : &rp.x[kChunk + tok][pch]));
      else xw[k] = to_f(rn.x[tok][pch]);
    }
  };
  auto store_ckpt = [&](int tile) {
    if (p.ckpt != nullptr)
      scan::store_states<NS>(p.ckpt + (((int64_t)b * n_tiles + tile) * D + cs) * kN + j * NS, h);
  };
  // kSubCk: scan_tile's hook(t) runs before token t's update, so at t = 8, 16, 24 h is the state after token t - 1:
  // sub-chunk row t / 8 - 1 of the tile, (b, n_tiles, kSubCkptRows, D, 16). (t is a constant in the unrolled scan: no
  // branch.)
  auto store_sub = [&](int tile, int t) {
    if constexpr (kSubCk) {
      if (t == 8 || t == 16 || t == 24)
        scan::store_states<NS>(
            p.ckpt_sub + ((((int64_t)b * n_tiles + tile) * kSubCkptRows + t / 8 - 1) * D + cs) * kN + j * NS, h);
    }
  };
  if constexpr (kSubCk) {
    if (blockIdx.x == 0 && blockIdx.y == 0 && tid == 0) *p.ckpt_sub_flag = 1.f;
  }

  int Tv = 0, last_slot = 0;  // (the last tile's raw tile: the pipelined schedule)
  // kSeq in the pipelined kernel: no ids in shared memory - each warp loads the ids around a tile from global memory
  // into a bit mask of document starts (scan::doc_starts), and the prep tests the mask's bits (item_taps).
  auto doc_bits = [&](uint64_t st, int (&sw)[TPT + 3]) { sw[0] = (int)(unsigned)(st >> (tb + 1)); };
  if constexpr (kTma) __syncthreads();  // the barriers' initialisation before anyone waits on them
  if constexpr (kPipe) {
    // Pipelined schedule (v5 K = 8 with TMA, session 11; docs/notes/scan.md "Session 11"): ONE block barrier per
    // tile instead of three, and tile i + 1's prep (latency-bound chains: ncu had the prep at 19 % of the
    // instructions and 40 % of the stall samples, the barrier before it at 11 %) issued between tile i's scan
    // tokens, whose ex2 / FFMA stream hides it:
    //   S1 (tile i + 1's copies landed; every warp is done with tile i - 1 and has prepped tile i): TMA of tile
    //      i + 2 into raw[(i + 2) % 3]; y of tile i - 1 (y[(i - 1) % 2]: tile i's gate, with no barrier in
    //      between, writes y[i % 2] - racecheck found the single buffer); checkpoint;
    //   per warp: the scan of tile i (raw[i % 3], items[i % 2]) with, between its tokens, the warp's own dt_proj
    //      rows of tile i + 1 (dt_rows_of_warp), its conv inputs from the raw tiles (prep_load_raw) and its 4 prep
    //      items of tile i + 1 (-> items[(i + 1) % 2]); gate -> y.
    // The prologue runs tile 0's phase A and prep with block barriers (the initial conv state lives in xf). On the
    // last tile the prep runs on stale buffers into items nobody reads (keeps the scan branch-free).
    static_assert(kTma && kV5Diet && kRawBC, "the pipelined schedule is the TMA v5 K = 8 kernel's");
    constexpr int kEvery = kChunk / TPT;  // scan tokens per prep item
    uint32_t phases = 1;                  // bit s: the parity of raw[s]'s next fill (raw[0]'s first is consumed)
    tma::wait(&sm.tma_bar[0], 0);
    __syncthreads();
    phase_a(sm.raw[0], 0);
    __syncthreads();
    {
      float xw[TPT + 3];
      int sw[TPT + 3];
      prep_load(0, xw, sw);
      if constexpr (kSeq) {
        doc_bits(scan::doc_starts(scan::load_doc_ids(p, b, 0, lane), lane), sw);
      }
#pragma unroll
      for (int i = 0; i < TPT; ++i) prep_item(i, sm.raw[0], 0, L, xw, sw, true);
    }
    int slot = 0;  // tile % 3
    // kSeq (session 14, A/B in bench/results/s14 and docs/notes/scan.md): the ids around tile + 1 (its prep) are
    // loaded a tile ahead, at the top of tile's predecessor, and turned into tile + 1's start mask at the top of tile,
    // outside the scan. Session 13's version (ids loaded at the tile's top, mask built at the scan's token 1) was 33 %
    // slower than the kernel without documents at b1 L8192; this one is 18 % slower (0.4525 vs 0.383 ms). ncu: the
    // prep's MUFU chains interleave worse with the scan (short-scoreboard stalls on their consumers); without the ids'
    // loads and mask the kernel runs at the no-document speed, with them but no tap tests 0.447 ms - it is ptxas's
    // schedule of the loop, not the instructions. Loading the ids at the tile's top and building the mask after S1:
    // 0.461. A mask carried through the loop for the final conv state cost registers: that state reads the ids.
    int2 next_ids = make_int2(0, 0);
    if constexpr (kSeq) next_ids = scan::load_doc_ids(p, b, kChunk, lane);
    for (int tile = 0; tile < n_tiles; ++tile) {
      const int t0 = tile * kChunk, par = tile & 1;
      const int slot1 = slot == 2 ? 0 : slot + 1, slot2 = slot1 == 2 ? 0 : slot1 + 1;
#ifdef APRIEL_SCAN_BLOCK_TIMES
      if (tid == 0) scan::block_time_mark(y + c0, tile, n_tiles);  // (y row 0, stored in tile 1)
#endif
      Tv = min(kChunk, L - t0);
      int sw[TPT + 3] = {};  // kSeq: the prep rows' starts (doc_bits) around tile + 1
      bool any_start = false;  // kSeq: a start in rows 1 .. 34 around tile + 1 (its tokens' rows and taps)
      if constexpr (kSeq) {
        const uint64_t st = scan::doc_starts(next_ids, lane);
        any_start = ((st >> 1) & ((1ull << (kChunk + 2)) - 1ull)) != 0;
        doc_bits(st, sw);
        next_ids = scan::load_doc_ids(p, b, t0 + 2 * kChunk, lane);  // (for the next iteration)
      }
      if (tile + 1 < n_tiles) {
        tma::wait(&sm.tma_bar[slot1], (phases >> slot1) & 1);
        phases ^= 1u << slot1;
      }
      __syncthreads();  // S1
      if (tile + 2 < n_tiles && tid == 0)
        stage_tma<T, kR>(p, maps, sm.raw[slot2], &sm.tma_bar[slot2], b, head, group, t0 + 2 * kChunk);
      if (tile > 0) store_y(t0 - kChunk, par ^ 1);
      const RawTile<T, kR>& r1 = sm.raw[slot1];
      float xw[TPT + 3];
      store_ckpt(tile);
      const int tv1 = L - t0 - kChunk;  // the next tile's valid tokens (<= 0: the items past the end)
      const RawTile<T, kR>& r0 = sm.raw[slot];
      // (session 11 A/B: these phase-A steps inside the scan rather than between S1 and the scan: -1 to -1.5 % at
      // L32768; on the last tile they write stale rows into dtp, which nobody reads then)
      auto run_tile = [&](bool docs) {
        scan_tile(r0, par, par, [&](int t) {
          if (t == 0) dt_rows_of_warp(r1);
          if (t == 1) {
            __syncwarp();  // the warp's dt_proj rows
            prep_load_raw(r1, r0, xw);
          }
          if (t % kEvery == kEvery / 2) prep_item(t / kEvery, r1, par ^ 1, tv1, xw, sw, docs);
          store_sub(tile, t);
        });
      };
      // kSeq: a tile + 1 without a document start (most tiles: documents are hundreds of tokens) runs the scan with
      // the prep of the kernel without documents - block-uniform branch, two copies of the unrolled scan
      if (kSeq && any_start) run_tile(true);
      else run_tile(false);
      last_slot = slot;
      slot = slot1;
    }
  } else {
    for (int tile = 0; tile < n_tiles; ++tile) {
      const int t0 = tile * kChunk, par = tile & 1;
      Tv = min(kChunk, L - t0);
      const RawTile<T, kR>& r = sm.raw[par];
      cp_async_wait_all();
      __syncthreads();  // S1: this tile's copies visible; every reader of the previous tile is done
      if (tile + 1 < n_tiles) {
        stage<T, NT, kR>(p, sm.raw[par ^ 1], b, head, group, t0 + kChunk);
        cp_async_commit();
      }
      if (tile > 0) store_y(t0 - kChunk, par ^ 1);
      phase_a(r, par);
      __syncthreads();  // S2
      {
        float xw[TPT + 3];
        int sw[TPT + 3];
        prep_load(par, xw, sw);
#pragma unroll
        for (int i = 0; i < TPT; ++i) prep_item(i, r, 0, Tv, xw, sw, true);
      }
      store_ckpt(tile);
      __syncthreads();  // S3
      scan_tile(r, 0, kV5 ? 0 : par, [&](int t) { store_sub(tile, t); });
    }
  }
  __syncthreads();
  const int last_par = (n_tiles - 1) & 1;
  {  // last tile's y (ragged)
    const int t0 = (n_tiles - 1) * kChunk;
    for (int i = tid; i < Tv * kCPR; i += NT) {
      const int row = i / kCPR, part = i % kCPR;
      *reinterpret_cast<uint4*>(y + (int64_t)(t0 + row) * D + c0 + part * kVec) =
          *reinterpret_cast<const uint4*>(&sm.y[kV5 && !kPipe ? 0 : last_par][row][part * kVec]);
    }
  }
  scan::store_states<NS>(p.final_ssm + ((int64_t)b * D + cs) * kN + j * NS, h);
  // Final conv state: the last W-1 x inputs of the last document (xf rows Tv+3-hw .. Tv+2), written by the
  // group's first head.
  const int hw = W - 1;
  if (head % p.heads_per_group == 0 && tid < kN * hw) {
    const int ch = tid / hw, k = tid % hw, row = Tv + 3 - hw + k;
    float v;
    if constexpr (kPipe) {  // xf holds only the initial conv state: the raw tiles (or that state) hold the inputs
      const int tok = row - 3, prev_slot = last_slot == 0 ? 2 : last_slot - 1;
      v = tok >= 0 ? to_f(sm.raw[last_slot].x[tok][ch])
                   : n_tiles > 1 ? to_f(sm.raw[prev_slot].x[kChunk + tok][ch]) : sm.xf[1][skew_row<TPT>(kChunk + row)][ch];
    } else {
      v = sm.xf[last_par][skew_row<TPT>(row)][ch];
    }
    bool same = true;  // kSeq: the last document's inputs only
    if constexpr (kSeq && kPipe) {  // no start at the tokens after tok (rows row + 1 .. Tv + 2), from global memory
      // (not a mask carried through the tile loop: registers live across the scan cost the b1 forward time)
      const int* sq = p.seq_idx + (int64_t)b * L;
      const int tok = (n_tiles - 1) * kChunk + row - 3;
      for (int u = max(tok, 0) + 1; u < L; ++u) same = same && sq[u] == sq[u - 1];
    } else if constexpr (kSeq) {
      same = sm.seqf[last_par][row] == sm.seqf[last_par][Tv + 2];
    }
    static_cast<T*>(p.final_conv)[((int64_t)b * p.d_xb + group * kN + ch) * hw + k] = from_f<T>(same ? v : 0.f);
  }
#ifdef APRIEL_SCAN_BLOCK_TIMES
  if (tid == 0) scan::block_time_end(y + D + c0, 0);  // (y row 1)
#endif
}

template <typename T, int K, int kR, bool kSeq, bool kRawBC, int kVer = 4, bool kTma = false, bool kSubCk = false>
void launch_kernel(const MixerScanParams& p, const tma::ScanMaps& maps, void* stream) {
  const size_t smem = sizeof(SmemForT<T, kR, K, kSeq, kRawBC, kVer, kTma>);
  auto kernel = mixer_scan_fwd4_kernel<T, K, kR, kSeq, kRawBC, kVer, kTma, kSubCk>;
  static bool configured = false;  // per instantiation; a race here only repeats an idempotent call
  if (!configured) {
    if (smem > 48 * 1024)
      APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    // Blocks per SM are bounded by shared memory: ask for the largest carveout (the default gave 135 KB: 4 blocks).
    APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           (int)cudaSharedmemCarveoutMaxShared));
    configured = true;
  }
  dim3 grid(p.d_inner / kN, p.batch);
  kernel<<<grid, kN * K, smem, static_cast<cudaStream_t>(stream)>>>(p, maps);
  APRIEL_CHECK_LAUNCH();
}

// TMA staging (and with it the pipelined schedule, session 11) for v5 K = 8 (the batch 1-2 default at D 4096) with
// 16-bit activations and dt_rank <= 16 (packed documents too since session 14), where tma::usable() and the host can
// encode the maps; cp.async (and the 3-barrier schedule) everywhere else. K = 4 (batch 3, small models) is not done
// yet: its 8 blocks per SM leave no room for the barriers' 16 bytes (WithTmaBarriers) without shrinking another
// array, and it was not measured.
template <typename T, int K, int kR, bool kSeq, bool kRawBC, int kVer = 4>
void launch(const MixerScanParams& p, void* stream) {
  if constexpr (kVer >= 5 && sizeof(T) == 2 && kR == 16 && kRawBC) {
    // (instantiated in mixer_scan_fwd5s_*.cu; false where it has no kernel for p: the kernels below write no rows,
    // their flag stays 0 and the backward recomputes them)
    if (p.ckpt_sub != nullptr && launch_mixer_scan_fwd5_sub<T, K>(p, stream)) return;
  }
  tma::ScanMaps maps{};
#if APRIEL_TMA
  if constexpr (kVer >= 5 && K == 8 && sizeof(T) == 2 && kR == 16) {  // (packed documents too, since session 14)
    if (encode_scan_maps(p, maps)) {
      launch_kernel<T, K, kR, kSeq, kRawBC, kVer, true>(p, maps, stream);
      return;
    }
  }
#endif
  launch_kernel<T, K, kR, kSeq, kRawBC, kVer, false>(p, maps, stream);
}

}  // namespace scan4

#ifdef APRIEL_SCAN_V5_SUB_TU  // (defined only in mixer_scan_fwd5s_*.cu: the other TUs link to their instances)
// v5 with sub-chunk checkpoints (kSubCk), 16-bit, dt_rank <= 16, with or without documents: K = 8 with TMA staging (the
// batch 1-2 kernel at d_inner 4096), K = 4 with cp.async (batch 3). False where p would run another kernel (K = 8
// without TMA).
template <typename T, int K, bool kSeq>
bool launch_fwd5_sub(const MixerScanParams& p, void* stream) {
  tma::ScanMaps maps{};
  if constexpr (K == 8) {
#if APRIEL_TMA
    if (!scan4::encode_scan_maps(p, maps)) return false;
    scan4::launch_kernel<T, 8, 16, kSeq, true, 5, true, true>(p, maps, stream);
    return true;
#else
    (void)p; (void)stream;
    return false;
#endif
  } else {
    scan4::launch_kernel<T, K, 16, kSeq, true, 5, false, true>(p, maps, stream);
    return true;
  }
}
template <typename T, int K>
bool launch_mixer_scan_fwd5_sub(const MixerScanParams& p, void* stream) {
  return p.seq_idx != nullptr ? launch_fwd5_sub<T, K, true>(p, stream) : launch_fwd5_sub<T, K, false>(p, stream);
}
#endif

// K = 4 (4 states per thread) or 8 (2 states); dt_rank staged 16 or 32 wide.
template <typename T, int K>
void launch_mixer_scan_fwd4(const MixerScanParams& p, void* stream) {
  const bool seq = p.seq_idx != nullptr;
  if constexpr (sizeof(T) == 2) {
    if (p.raw_bc) {
      if (p.dt_rank <= 16) seq ? scan4::launch<T, K, 16, true, true>(p, stream) : scan4::launch<T, K, 16, false, true>(p, stream);
      else seq ? scan4::launch<T, K, 32, true, true>(p, stream) : scan4::launch<T, K, 32, false, true>(p, stream);
      return;
    }
  }
  if (p.dt_rank <= 16) seq ? scan4::launch<T, K, 16, true, false>(p, stream) : scan4::launch<T, K, 16, false, false>(p, stream);
  else seq ? scan4::launch<T, K, 32, true, false>(p, stream) : scan4::launch<T, K, 32, false, false>(p, stream);
}

// v5 (kVer 5; APRIEL_SCAN_FWD=v5 / v5k4 / v5k8): 16-bit activations always read B / C from the raw tile (the
// fp32-copy A/B variant stays a v4 option), so one instantiation less per shape.
template <typename T, int K>
void launch_mixer_scan_fwd5(const MixerScanParams& p, void* stream) {
  constexpr bool kRaw = sizeof(T) == 2;
  const bool seq = p.seq_idx != nullptr;
  if (p.dt_rank <= 16) seq ? scan4::launch<T, K, 16, true, kRaw, 5>(p, stream) : scan4::launch<T, K, 16, false, kRaw, 5>(p, stream);
  else seq ? scan4::launch<T, K, 32, true, kRaw, 5>(p, stream) : scan4::launch<T, K, 32, false, kRaw, 5>(p, stream);
}

}  // namespace apriel
