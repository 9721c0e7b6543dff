// Fused Apriel-H1 mixer scan, forward, v7: the input product and the readout on tensor cores (16-bit activations).
//
// Why a v7: v5 (mixer_scan_fwd4.cuh) spends ~13.4 executed instructions per (channel, state, token) element at
// batch 8 (ncu, docs/notes/scan.md): the 5-instruction recurrence core plus bf16 unpacking of B / C (2.0), the
// K-lane reduce-scatter of the readout (1.2) and the operand loads, against ~8 that a MUFU-bound kernel affords.
// v7 gives one WARP one head (16 channels x 16 states) in the mma accumulator layout - lane (g = lane / 4,
// q = lane % 4) owns mma rows {g, g + 8} (= channels 2g, 2g + 1: see "Channel labels" below) x states
// {2q, 2q + 1, 8 + 2q, 9 + 2q} (8 elements) - and per token:
//   dBu = du (x) B      two mma.m16n8k4 (tf32): A = du of the 16 channels (every k column holds du: the B
//                       operand's rows k >= 1 are zero, so no lane selects), B = B_t in row k = 0;
//   h = ex2(delta A2) h + dBu   8 x (FMUL, MUFU.EX2, FFMA) per lane: the only work on the h chain;
//   C . h               two chained mma.m16n8k8 (tf32): A = h (the accumulator layout IS the A layout once the
//                       registers are passed in the order c0, c2, c1, c3: k = q <-> column 2q, k = q + 4 <->
//                       column 2q + 1), B = C_t replicated in all 8 columns: every lane gets the finished readout
//                       of its two channels, no reduction; one 8-byte store per token, the gate (C . h) sz + D u sz
//                       is applied per half when the y rows are stored.
// Per token and lane ~38 SASS instructions for 8 elements (v5: ~13.4 per element executed); ncu at b8 L4096
// (bench/results/s5/ncu/): 9.2 executed instructions per element in all, 54 % issue, the MUFU pipe at ~68 %
// (1.375 MUFU ops per element: the scan's ex2 plus 6 per (channel, token) in the prep), top stalls fixed-latency
// dependencies and the MIO queue (MUFU and shared-memory instructions share it). Session 9: one of a lane's 8
// exponentials per token runs on the FMA pipe (ex2_fma, scan_math.cuh: ~10 FP32 / integer instructions, the same
// accuracy as ex2.approx): 1.25 MUFU ops per element, b8 L4096 -2 to -4 % (bench/results/s9); two of 8: slower.
// Session 16: 4 MUFU ops per (channel, token) in the prep instead of 6 (sigmoid_pair, softplus_poly: 1.125 per
// element): b8 L4096 -0.7 %, packed -0.5 % (bench/results/s16/ab_fwd7_mufu/) - the MUFU pipe is not what bounds it.
// Precision: du is rounded to tf32 (round to nearest) in the prep and B / C are 16-bit values, exact in tf32; the
// readout reads h through tf32 (truncation, relative error < 2^-10 per term). For 16-bit outputs this is below
// their rounding (docs/notes/scan.md, session 5; scripts/diag/scan_tf32_emulation.py); fp32 activations keep v4.
// The state recurrence itself stays fp32 (FFMA), so the final state and the checkpoints keep fp32 accuracy up to
// the tf32 rounding of du.
//
// Block = 4 consecutive heads of one x / B group (4 warps; kPartial, session 19: a group whose head count 4 does not
// divide spreads its heads evenly over its blocks, whose other warps have no head), one sequence. Per
// 32-token tile: one block barrier, issue the next tile's copies; then each warp alone, per 16-token half: prep
// (dt_proj by mma in the accumulator layout, conv + silu, softplus(. + 2 b_dt), silu(z)) -> per (token, row)
// du = (tf32(delta u), delta) and gt = (silu z, D u silu z) pairs, and the C operand words; __syncwarp; the 16
// tokens of the scan; the half's y rows gated and stored by the warp. No block barrier between prep and scan (a
// head's prep is its warp's).
// At the tile's end: wait for the next tile's copies and A (block) for it - x -> fp32 with the carried conv halo,
// the B operand rows, both by tile parity - so that the next barrier covers it (session 16; before: A between two
// barriers at the tile's top).
// Packed documents (seq_idx, kSeq; session 12): each warp loads the document ids around its tile from global memory
// into a bit mask of document starts (doc_starts; session 13 - session 12 staged them by cp.async next to the tile,
// 9 % slower than without documents), and the prep masks conv taps from another document and sets the decay
// argument to +inf at a document start (ex2 -> 0 resets h; the FMA-pipe exponential clamps, so its exact 0 is
// selected), as v5 does: the same arithmetic per token as separate calls (bitwise, tested).
// Sub-chunk checkpoints (session 30, kSubCk; the varlen kernel for whole groups since session 31): the states after
// tokens 7, 15, 23 of every tile too, for the v7 backward (which then skips its pass A; APRIEL_SCAN_CKPT=sub).
// Not handled (the dispatcher falls back to v5 / v4): fp32 activations, dt_rank > 16, unaligned zxbc / dt_low rows
// (no 16-byte copies).
#pragma once
#include "../common/cuda_check.h"
#include "scan_common.cuh"
#include "mixer_scan_fwd4.cuh"  // scan4:: MmaOp (dt_proj mma), unpack2, ld_param, softplus_select, cp.async
#include "../common/tma.cuh"     // tile staging by the bulk tensor copy engine (CUTLASS / CuTe sm_90 primitives)

namespace apriel {
namespace scan7 {

using scan::from_f;
using scan::kChunk;
using scan::kLog2e;
using scan::kN;
using scan::to_f;

constexpr int kHeads = 4;             // heads (warps) per block
constexpr int kThreads = 32 * kHeads;
constexpr int kHalf = 16;             // tokens per prep / scan half = one m16 tile of the dt_proj mma
constexpr int kR = 16;                // staged dt_rank (dt_rank <= 16; columns >= dt_rank are zeroed)

template <typename T>
struct Raw7 {                          // one tile as it sits in global memory
  alignas(16) T x[kChunk][kN];         // the group's x slice
  alignas(16) T B[kChunk][kN];
  alignas(16) T dt[kChunk][kR];
  alignas(16) T z[kHeads][kChunk][kN];
  alignas(16) T C[kHeads][kChunk][kN];
};
template <typename T>
struct Smem7 {
  using Raw = Raw7<T>;
  Raw raw[2];                                  // by tile parity: 22 KB
  alignas(16) float xf[2][kChunk + 3][kN];     // fp32 conv input by parity; rows 0..2 = the 3 tokens before
  // by parity: the B operand per token pair (t, t+1): (B_t[g], B_t[8+g], B_t+1[g], B_t+1[8+g]) for g < 8; entry 8 =
  // zeros
  alignas(16) float4 bop[2][kChunk / 2][9];
  // per (head, token, row g < 8) = channels 2g and 2g + 1 of the head: du = (tf32(delta u) x 2, delta x 2) - the
  // first two are the k4 mma's A operand as loaded - and gt = (silu z x 2, D u silu z x 2) for the gate. Rows
  // padded to 9 entries: the prep's 16-byte stores (lane (g, q) -> row g + 8 rr, entry 2q + nt) hit 8 bank groups
  // per quarter warp instead of 4 (ncu: 8 wavefronts per store instead of 4)
  alignas(16) float4 du[kHeads][kHalf][9];
  alignas(16) float4 gt[kHeads][kHalf][9];
  // C operand per token pair (t, t+1) and lane quad q: the 16-bit words (C[2q], C[2q+1]) and (C[8+2q], C[9+2q]) of
  // both tokens (one 16-byte load per 2 tokens; unpacked in registers)
  alignas(16) uint4 cop[kHeads][kHalf / 2][4];
  alignas(16) float yf[kHeads][kHalf][kN];      // readout C . h (before the gate) per (token, channel)
  alignas(8) uint64_t bar[2];                   // TMA staging: the transaction barrier of raw[parity]
  int item;                                     // kVar: the document the block took (block broadcast)
};
// 4 blocks per SM (the launch bounds; a b8 L4096 grid is one wave of them): 228 KB of shared memory per SM, less
// the 1 KB the runtime reserves per block
static_assert(sizeof(Smem7<__nv_bfloat16>) + 1024 <= 233472 / 4, "Smem7: 4 blocks per SM must fit");
// kSeq (packed documents): a bit mask of the document starts around the tile per warp, from the ids in global memory
// (session 13; session 12 staged the ids by cp.async next to the tile: the forward 9 % and the backward 12 % slower
// than without documents, of which the staging alone was 6 % in the backward's A/B).
using scan::doc_starts;  // (kSeq: scan_common.cuh)
using scan::doc_taps;
using scan::load_doc_ids;
using scan::no_start;

__device__ __forceinline__ float tf32_rna(float v) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return __uint_as_float(r);
}

// A (block) of a staged tile, shared by the v7 forward and backward, one call each per thread of the 128 (the caller
// fills the 3 halo rows of xf in between): the group's x rows to fp32 (xf rows 3 .. 34), and the B operand per token
// pair, (B_t[g], B_t[8+g], B_t+1[g], B_t+1[8+g]) for g < 8 (entry 8, the zeros, is the caller's).
// (The array forms serve the backward's second group of a block, mixer_scan_bwd7.cuh kSpan.)
// Thread tid's quad of x (row tid / 4, channels 4 (tid % 4) .. + 3; 128 threads = 32 rows x 4 quads), 4 16-bit
// values as loaded, into xf row 3 + tid / 4 (convert_x; the v7 backward's kMulti loads its quads from global memory).
template <typename T>
__device__ __forceinline__ void store_x_quad(uint2 wx, float (*xf)[kN], int tid) {
  const float2 x01 = scan4::unpack2<T>(wx.x), x23 = scan4::unpack2<T>(wx.y);
  *reinterpret_cast<float4*>(&xf[3 + tid / 4][(tid % 4) * 4]) = make_float4(x01.x, x01.y, x23.x, x23.y);
}
template <typename T>
__device__ __forceinline__ void convert_x(const T (*x)[kN], float (*xf)[kN], int tid) {
  store_x_quad<T>(*reinterpret_cast<const uint2*>(&x[tid / 4][(tid % 4) * 4]), xf, tid);
}
template <typename T>
__device__ __forceinline__ void convert_x(const Raw7<T>& rc, float (*xf)[kN], int tid) {
  convert_x<T>(rc.x, xf, tid);
}
template <typename T>
__device__ __forceinline__ void convert_b(const T (*B)[kN], float4 (*bop)[9], int tid) {
  const int pr = tid / 8, bg = tid % 8;  // 16 token pairs x 8
  bop[pr][bg] = make_float4(to_f(B[2 * pr][bg]), to_f(B[2 * pr][bg + 8]), to_f(B[2 * pr + 1][bg]),
                            to_f(B[2 * pr + 1][bg + 8]));
}
template <typename T>
__device__ __forceinline__ void convert_b(const Raw7<T>& rc, float4 (*bop)[9], int tid) {
  convert_b<T>(rc.B, bop, tid);
}

// d = A (16 x 4, rows = channels, every column du) * B (4 x 8, row 0 = B_t, rows 1..3 zero).
__device__ __forceinline__ void mma_k4(float (&d)[4], float a0, float a1, float b0) {
  asm("mma.sync.aligned.m16n8k4.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%7,%7,%7};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(__float_as_uint(a0)), "r"(__float_as_uint(a1)), "r"(__float_as_uint(b0)), "f"(0.f));
}

// d = A (16 x 8: h, rows = channels, k = states) * B (8 x 8: C_t in every column) + c.
__device__ __forceinline__ void mma_k8(float (&d)[4], float a0, float a1, float a2, float a3, float b0, float b1,
                                       float c0, float c1, float c2, float c3) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(__float_as_uint(a0)), "r"(__float_as_uint(a1)), "r"(__float_as_uint(a2)), "r"(__float_as_uint(a3)),
        "r"(__float_as_uint(b0)), "r"(__float_as_uint(b1)), "f"(c0), "f"(c1), "f"(c2), "f"(c3));
}

// The scan of one 16-token half of one head (the calling warp's), fully unrolled; only the FFMA of h is on the
// dependence chain. Shared by the mixer's v7 forward and the generic selective scan's (csrc/sscan/sscan_fwd7.cuh).
// mid_state() runs after the 8th token's update (h = the state after it).
// In: du[tl][g] = (du, du, delta, delta) of rows g (channels 2g, 2g + 1) per token tl of the half; bop[pr0 + pr][.]
// the B operand per token pair of the half (entry 8: zeros, read by the lanes q > 0 through bsel); cop[pr][q] the C
// words per token pair and lane quad. Out: yf[tl][channel] = C . h (before the gate); h advanced by 16 tokens.
// front(t): operands, dBu (mma) and the 8 exponentials of token t - none depends on h. Shared-memory operands are
// loaded 2 tokens ahead of their use (H100: b1 L8192 0.834 vs 0.910 ms, b8 L4096 1.110 vs 1.125 ms with the (du,
// delta) loads alone; bench/results/s5/pd2/): (du, delta) per token, the B operand and the C words per token pair.
struct NoMidState {  // scan_half's default: nothing after the half's 8th token
  __device__ __forceinline__ void operator()() const {}
};
template <typename T, bool kSeq, typename MidState = NoMidState>
__device__ __forceinline__ void scan_half(const float4 (*du)[9], const float4 (*bop)[9], int pr0, int bsel,
                                          const uint4 (*cop)[4], float (*yf)[kN], const float (&A2)[2][4],
                                          float (&h)[2][4], int g, int q, MidState mid_state = {}) {
  float4 pdq[2] = {du[0][g], du[1][g]};
  float4 bo = bop[pr0][bsel], bo_next = bop[pr0 + 1][bsel];
  uint4 cw2 = cop[0][q], cw_next = cop[1][q];  // the C words of the current / next token pair
  auto front = [&](int tl, float (&dA)[2][4], float (&db)[2][4]) {
    const float4 pd = pdq[tl & 1];  // (du, du, delta, delta) of channels 2g, 2g + 1
    if (tl + 2 < kHalf) pdq[tl & 1] = du[tl + 2][g];
    if (tl > 0 && (tl & 1) == 0) {  // a new token pair: rotate the B operand, fetch the pair after next
      bo = bo_next;
      if (tl / 2 + 1 < kHalf / 2) bo_next = bop[pr0 + tl / 2 + 1][bsel];
    }
    mma_k4(db[0], pd.x, pd.y, (tl & 1) ? bo.z : bo.x);
    mma_k4(db[1], pd.x, pd.y, (tl & 1) ? bo.w : bo.y);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float dl = i < 2 ? pd.z : pd.w;
      dA[0][i] = ex2(dl * A2[0][i]);
      // one of the lane's 8 exponentials on the FMA pipe (session 9, bench/results/s9/carry_emu: b8 L4096
      // 1.113 -> 1.094 ms; two of 8: 1.136, slower). With documents too, although all 8 on MUFU measured 1.5 %
      // faster there (session 16, bench/results/s16/ab_fwd7_mufu/): packed == separate calls is bitwise only
      // when both compute the same exponentials (the final state differed by an ulp)
      dA[1][i] = i == 3 ? ex2_fma(dl * A2[1][i]) : ex2(dl * A2[1][i]);
      // (a document start: ex2_fma clamps -inf to 2^-125, MUFU's ex2 flushes it to 0 - restart exactly. Session
      // 18: a copy of the scan without this fix-up for halves without a start measured 1-3 % slower,
      // bench/results/s18/ab_seq_scan/.)
      if constexpr (kSeq) {
        if (i == 3) dA[1][i] = dl == __int_as_float(0x7f800000) ? 0.f : dA[1][i];
      }
    }
  };
  float dA[2][2][4], db[2][2][4];  // by token parity
  front(0, dA[0], db[0]);
#pragma unroll
  for (int tl = 0; tl < kHalf; ++tl) {
    const int cur = tl & 1;
    if (tl + 1 < kHalf) front(tl + 1, dA[cur ^ 1], db[cur ^ 1]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      h[0][i] = fmaf(dA[cur][0][i], h[0][i], db[cur][0][i]);
      h[1][i] = fmaf(dA[cur][1][i], h[1][i], db[cur][1][i]);
    }
    if (tl == kHalf / 2 - 1) mid_state();  // h after the half's first 8 tokens (the sub-chunk checkpoints)
    if (tl > 0 && (tl & 1) == 0) {
      cw2 = cw_next;
      if (tl / 2 + 1 < kHalf / 2) cw_next = cop[tl / 2 + 1][q];
    }
    const float2 clo = scan4::unpack2<T>((tl & 1) ? cw2.z : cw2.x);
    const float2 chi = scan4::unpack2<T>((tl & 1) ? cw2.w : cw2.y);
    float yv[4];
    mma_k8(yv, h[0][0], h[0][2], h[0][1], h[0][3], clo.x, clo.y, 0.f, 0.f, 0.f, 0.f);
    mma_k8(yv, h[1][0], h[1][2], h[1][1], h[1][3], chi.x, chi.y, yv[0], yv[1], yv[2], yv[3]);
    if (q == 0) *reinterpret_cast<float2*>(&yf[tl][2 * g]) = make_float2(yv[0], yv[2]);
  }
}

// One gated y row part of a half (after scan_half and a __syncwarp): lane = (row = lane / 2, part = lane % 2: 8
// channels), y = (C . h) sz + D u sz with gt[row][.] = (sz, sz, D u sz, D u sz) of channel pairs; the 8 outputs
// packed as the caller stores them (16 bytes).
template <typename T>
__device__ __forceinline__ uint4 gate_row(const float (*yf)[kN], const float4 (*gt)[9], int row, int part) {
  using M = scan4::MmaOp<T>;
  const float4 ya = *reinterpret_cast<const float4*>(&yf[row][part * 8]);
  const float4 yb = *reinterpret_cast<const float4*>(&yf[row][part * 8 + 4]);
  const float yv[8] = {ya.x, ya.y, ya.z, ya.w, yb.x, yb.y, yb.z, yb.w};
  unsigned out[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // gt entry 4 part + k = channels 8 part + 2k, + 1
    const float4 gg = gt[row][4 * part + k];
    out[k] = M::pack(fmaf(yv[2 * k], gg.x, gg.z), fmaf(yv[2 * k + 1], gg.y, gg.w));
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// The tile starting at t0 into r: 16-byte cp.async copies (the host checked alignment), rows past the end zeroed.
// The 11 slices (x, B, dt, z of 4 heads, C of 4 heads) are 1 KB each and consecutive in Raw; copy i of a slice is
// (row i / 2, 16-byte part i % 2). Thread tid always copies row (tid % 64) / 2, part tid % 2 of slices
// 2k + (tid / 64), k = 0..5: the row address is computed once and each slice adds its column (a generic per-copy
// index computation with a branch for the dt slice cost ~40 instructions per copy in SASS).
template <typename T>
__device__ __forceinline__ void stage(const MixerScanParams& p, typename Smem7<T>::Raw& r, int b, int head0,
                                      int group, int t0, int tid, int n_heads = kHeads) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(sizeof(typename Smem7<T>::Raw) == 11 * kChunk * kN * sizeof(T), "Raw = 11 consecutive slices");
  static_assert(kThreads == 128, "2 slices per step");
  const int i = tid & 63, row = i >> 1, part = i & 1, odd = tid >> 6, pos = t0 + row;
  const bool live = pos < p.seqlen;
  const int64_t prow = live ? pos : 0;
  const T* zrow = static_cast<const T*>(p.zxbc) + (int64_t)b * p.zxbc_batch_stride + prow * p.zxbc_row_stride + part * kVec;
  const T* drow = static_cast<const T*>(p.dt_low) + (int64_t)b * p.dt_batch_stride + prow * p.dt_row_stride + part * kVec;
  const bool dt_ok = live && part * kVec < p.dt_rank;  // dt columns >= dt_rank are zero-filled (never read)
  T* dst = &r.x[0][0] + i * kVec + odd * (kChunk * kN);
  auto col_of = [&](int slice) {  // column of a zxbc slice in the in_proj row (slice 2 = dt_low: unused)
    return slice < 2 ? p.d_inner + slice * p.d_xb + group * kN
         : slice < 7 ? (head0 + slice - 3) * kN : p.d_inner + 2 * p.d_xb + (head0 + slice - 7) * kN;
  };
#pragma unroll
  for (int k = 0; k < 6; ++k) {
    const int sa = 2 * k, sb = 2 * k + 1;  // this step's two slices: odd selects
    if (k == 5 && odd) break;               // slice 11 does not exist
    const bool is_dt = sa == 2 && !odd;
    const T* src = is_dt ? drow : zrow + (odd ? col_of(sb) : col_of(sa));
    // z / C slices of heads >= n_heads (a group's last block, heads_per_group % 4 != 0): zero-filled, not read (their
    // columns may lie past the row)
    const int slice = odd ? sb : sa, hh = slice < 7 ? slice - 3 : slice - 7;
    const bool ok = is_dt ? dt_ok : live && (n_heads == kHeads || slice < 3 || hh < n_heads);
    scan4::cp_async16(dst + 2 * k * (kChunk * kN), ok ? src : zrow, ok);
  }
}

// The same tile by the bulk tensor copy engine (kTma), issued by ONE thread: thread 0 arms raw's barrier with the
// tile's bytes and copies the 11 slices (x, B, dt, z and C of the 4 heads), one box of 16 columns x 32 rows each. The
// engine zero-fills rows past the sequence end and dt columns past dt_rank, as the cp.async path does. (Not one box
// per lane: the copy instruction, UTMALDG, takes its operands in uniform registers, so per-lane boxes compile to a
// loop over the lanes - measured 2 % (b8) to 6 % (one block per SM) slower than cp.async, session 10.)
// per_head(hh) is called after head hh's z / C boxes: the backward v7 adds its dy boxes there. Heads hh >= n_heads (a
// group's last block, heads_per_group % 4 != 0) load head 0's boxes again: every box stays inside the row, so the
// transaction count is the same and no copy depends on how the engine treats a box wholly out of bounds.
template <typename T, typename PerHead>
__device__ __forceinline__ void load_slices(const MixerScanParams& p, const tma::ScanMaps& maps,
                                            typename Smem7<T>::Raw& r, uint64_t* bar, int b, int head0, int group,
                                            int t0, PerHead&& per_head, int n_heads = kHeads) {
  static_assert(sizeof(T) == 2 && tma::kBoxCols == kN && tma::kBoxRows == kChunk, "one box = one 16-bit slice");
  const int cx = p.d_inner + group * kN, cc = p.d_inner + 2 * p.d_xb + head0 * kN;
  tma::load_box(maps.zxbc, bar, &r.x[0][0], cx, t0, b);
  tma::load_box(maps.zxbc, bar, &r.B[0][0], cx + p.d_xb, t0, b);
  tma::load_box(maps.dt, bar, &r.dt[0][0], 0, t0, b);
#pragma unroll
  for (int hh = 0; hh < kHeads; ++hh) {
    const int h = hh < n_heads ? hh : 0;
    tma::load_box(maps.zxbc, bar, &r.z[hh][0][0], (head0 + h) * kN, t0, b);
    tma::load_box(maps.zxbc, bar, &r.C[hh][0][0], cc + h * kN, t0, b);
    per_head(hh);
  }
}
template <typename T>
__device__ __forceinline__ void stage_tma(const MixerScanParams& p, const tma::ScanMaps& maps,
                                          typename Smem7<T>::Raw& r, uint64_t* bar, int b, int head0, int group,
                                          int t0, int n_heads = kHeads) {
  tma::expect_bytes(bar, sizeof(r));
  load_slices<T>(p, maps, r, bar, b, head0, group, t0, [](int) {}, n_heads);
}

// Channel labels (session 5, run 2): mma row r of the scan is channel pi(r) = 2r (r < 8) / 2(r - 8) + 1, so lane
// (g, q) owns the ADJACENT channels 2g, 2g + 1 - its gated pair is one bf16x2 word in output order (the y rows
// store without permutes) - and column c of dt_proj n-tile nt is channel 4 (c / 2) + 2 nt + c % 2, so the prep lane
// q owns the 4 consecutive channels 4q .. 4q + 3 (one 16-byte load per conv tap, one 8-byte load of z) and
// writes the du / gt entries of rows 2q and 2q + 1. The B operand comes in token pairs (one 16-byte load per 2
// tokens). The scan is software-pipelined by hand: token t + 1's operands, dBu mma and exponentials are issued
// before token t's state update (H100 b8 L4096: 1.150 vs 1.205 ms unpipelined). Tried and not kept: the prep's
// per-channel constants in shared memory instead of 28 registers (1.238 ms; again after the relabelling: 1.147 vs
// 1.124 ms, bench/results/s5/rcp/cs*.json); the prep sigmoids' reciprocals by
// Newton steps on the FMA pipe instead of MUFU.RCP (one: 1.142, both: 1.162 vs 1.146 ms: fewer MUFU ops alone do not
// pay, bench/results/s5/rcp/); the readout's two mmas accumulated separately and summed / stored one token later
// (b8 1.087-1.111 vs 1.096-1.107 ms, b1 L8192 0.847 vs 0.820 ms: bench/results/s5/ro/).
// kTma: the tiles arrive by the bulk tensor copy engine (stage_tma, maps) instead of cp.async (stage); the rest of
// the kernel is the same code.
//
// kVar (varlen scheduling of packed documents, session 17; kSeq too): the block runs over documents instead of one
// sequence. The grid is (blocks per row, P); the blocks of column x (4 heads of one x / B group; with kPartial a
// group's share, session 23) take documents from the list that the plan (mixer_scan_plan.cu) built on the device,
// longest first, by an atomic counter per column (p.var_next[x]) until the list (p.var_items, p.var_count) is
// exhausted. A document [ts, te) of sequence b runs the tiles that hold it, tile ts / 32 .. (te - 1) / 32, from a
// zero state (the sequence's initial states when ts = 0): the tokens of other documents in its first and last tile
// are computed (the document mask resets h at ts) but never stored. So every document is scheduled on its own - a
// sequence of short documents gives batch 1 the blocks that the v7 layout needs, and a document's time is its own
// length, not the sequence's. Outputs are the kSeq
// kernel's bit for bit (tested): the same arithmetic per token, each y row, checkpoint and final state written by
// the block of the document it belongs to - checkpoint `tile` (the state after token 32 tile - 1) by the document
// holding that token, and when a document ends on a tile boundary, by its block after its last tile.
// kSubCk (session 30): also the sub-chunk checkpoints p.ckpt_sub (the states after tokens 7, 15, 23 of every tile) and
// their flag. A template flag: as a runtime branch it cost the kernel without them ~7 % at b8 (bench/results/s30/).
template <typename T, bool kTma, bool kSeq = false, bool kVar = false, bool kPartial = false, bool kSubCk = false>
__global__ void __launch_bounds__(kThreads, 4)
    mixer_scan_fwd7_kernel(MixerScanParams p, const __grid_constant__ tma::ScanMaps maps) {
  static_assert(!kVar || kSeq, "varlen scheduling is for packed documents");
  static_assert(!(kVar && kPartial && kSubCk), "the varlen kernel with partial groups writes no sub-chunk checkpoints");
  extern __shared__ __align__(128) unsigned char smem_raw[];  // 128: TMA destinations (raw slices) are 1 KB apart
  using SM = Smem7<T>;
  SM& sm = *reinterpret_cast<SM*>(smem_raw);
  using M = scan4::MmaOp<T>;
  const int tid = threadIdx.x, lane = tid % 32, w = tid / 32, g = lane / 4, q = lane % 4;
  // A block holds 4 consecutive heads of ONE x / B group. kPartial (heads_per_group % 4 != 0, session 19): a group
  // takes ceil(heads_per_group / 4) blocks that share its heads evenly, and a block's warps past its share have no
  // head - they stage and convert the tiles with the others, alias the block's first head for their constants (valid
  // reads) and skip the prep, the scan and every store (blocks_per_row). A template flag, not a runtime case: the general
  // index math moved the kernel's address arithmetic off the uniform datapath (+40 SASS instructions in the tile loop).
  int head0, group, n_heads = kHeads, sub = 0;  // sub: the block's first head within its group (kPartial)
  if constexpr (kPartial) {
    const V7GroupShare share = mixer_scan_v7_group_share(p.heads_per_group, blockIdx.x);  // (scan_params.h)
    group = share.group;
    sub = share.sub;
    head0 = group * p.heads_per_group + sub, n_heads = share.heads;
  } else {
    head0 = blockIdx.x * kHeads, group = head0 / p.heads_per_group;
  }
  const bool has_head = !kPartial || w < n_heads;
  const int head = head0 + (has_head ? w : 0), c0 = head * kN;
  const int D = p.d_inner, L = p.seqlen, R = p.dt_rank, W = p.width;
  const int n_tiles = p.n_chunks;
  int b = blockIdx.y;  // kVar: the document's sequence (set per document)

  if constexpr (kTma) {
    if (tid == 0) {
      tma::init_barriers(sm.bar);
      if constexpr (!kVar) stage_tma<T>(p, maps, sm.raw[0], &sm.bar[0], b, head0, group, 0, n_heads);
    }
  } else if constexpr (!kVar) {
    stage<T>(p, sm.raw[0], b, head0, group, 0, tid, n_heads);
    scan4::cp_async_commit();
  }
  // The sub-chunk checkpoints' flag (the host zeroed it; this kernel writes every row; kVar: below)
  if constexpr (kSubCk && !kVar) {
    if (blockIdx.x == 0 && blockIdx.y == 0 && tid == 0) *p.ckpt_sub_flag = 1.f;
  }
  // kVar: the block's first document, taken before the per-channel constants: when the plan did not pick varlen
  // (the list is empty), the block exits here (the empty launch then costs little).
  auto take_document = [&]() {
    if (tid == 0) sm.item = atomicAdd(p.var_next + blockIdx.x, 1);
    __syncthreads();  // the item, and the previous document's readers of xf / raw are done
    const int it = sm.item;
    return (unsigned)it < (unsigned)*p.var_count ? it : -1;  // block-uniform
  };
  int item = 0;
  if constexpr (kVar) {
    item = take_document();
    if (item < 0) return;
    // kSubCk: the plan picked varlen (its list is not empty; the v5 kernel returned at once): this launch writes every
    // row, the block that took column 0's first document sets the flag
    if constexpr (kSubCk) {
      if (item == 0 && blockIdx.x == 0 && tid == 0) *p.ckpt_sub_flag = 1.f;
    }
  }

  // Per-lane constants of the prep: channel 4q + j of this head (j = 2 nt + e).
  float cw[4][4], cbias[4], dtb2[4], dsk[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int cc = 4 * q + j, pc = c0 + cc;
    const int wch = p.repeat_before_conv ? pc : group * kN + cc;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int src = i - (4 - W);  // right-aligned taps: [3] multiplies the current token for every width
      cw[j][i] = src >= 0 ? scan4::ld_param(p.conv_w_raw, (int64_t)wch * W + src) : 0.f;
    }
    cbias[j] = p.conv_b_raw.ptr != nullptr ? scan4::ld_param(p.conv_b_raw, wch) : 0.f;
    dtb2[j] = 2.f * scan4::ld_param(p.dt_b_raw, pc);  // dt_proj's bias and delta_bias: the same vector twice
    dsk[j] = scan4::ld_param(p.D_raw, pc);
  }
  // dt_proj B fragments (m16n8k16: B[k][col] = W_dt[channel of column col][k]): lane holds column g, k = 2q, 2q+1
  // (first half) and 8+2q, 9+2q (second half).
  unsigned wb[2][2];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int k = hf * 8 + 2 * q;
      const int64_t row = (int64_t)(c0 + 4 * (g >> 1) + 2 * nt + (g & 1)) * R;
      wb[nt][hf] = M::pack(k < R ? scan4::ld_param(p.dt_w_raw, row + k) : 0.f, k + 1 < R ? scan4::ld_param(p.dt_w_raw, row + k + 1) : 0.f);
    }
  // Scan constants and state: h[nt][i] = channel 2g + (i >> 1), state 8 nt + 2q + (i & 1).
  float A2[2][4], h[2][4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int cs = c0 + 2 * g + (i >> 1), n = nt * 8 + 2 * q + (i & 1);
      A2[nt][i] = -__expf(scan4::ld_param(p.A_log_raw, (int64_t)cs * kN + n)) * kLog2e;
      if constexpr (!kVar) h[nt][i] = p.init_ssm != nullptr ? p.init_ssm[((int64_t)b * D + cs) * kN + n] : 0.f;
    }
  // kVar: h from the initial state of sequence b (first_doc) or zero, per document
  auto init_h = [&](bool first_doc) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int cs = c0 + 2 * g + (i >> 1), n = nt * 8 + 2 * q + (i & 1);
        h[nt][i] = first_doc && p.init_ssm != nullptr ? p.init_ssm[((int64_t)b * D + cs) * kN + n] : 0.f;
      }
  };
  auto store_h = [&](float* base) {  // base = the (b, D, 16)-layout row block of this sequence
    if (!has_head) return;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
        *reinterpret_cast<float2*>(base + (int64_t)(c0 + 2 * g + r) * kN + nt * 8 + 2 * q) =
            make_float2(h[nt][2 * r], h[nt][2 * r + 1]);
  };

  // The first tile's halo (xf[par] rows 0..2) is copied from rows kChunk.. of the other parity: the initial conv
  // state of sequence b goes there (first_doc; else zeros: the document mask drops those taps anyway).
  auto init_halo = [&](int par, bool first_doc) {
    if (tid < 3 * kN) {
      const int k = tid / kN, ch = tid % kN, kk = (W - 1) + (k - 3);
      sm.xf[par ^ 1][kChunk + k][ch] = (first_doc && p.init_conv != nullptr && kk >= 0)
                                           ? p.init_conv[((int64_t)b * p.d_xb + group * kN + ch) * (W - 1) + kk] : 0.f;
    }
  };
  if constexpr (!kVar) init_halo(0, true);
  if (tid < kChunk) sm.bop[tid / (kChunk / 2)][tid % (kChunk / 2)][8] = make_float4(0.f, 0.f, 0.f, 0.f);
  const int bsel = q == 0 ? g : 8;  // lanes q > 0 read the zero entry: rows k >= 1 of the B operand

  // A (block) of the tile in raw[cp]: x -> fp32 after the 3 halo rows (copied from the previous tile's last rows in
  // xf[cp ^ 1]), the B operand rows (token pairs). Runs at the END of the previous tile (tile 0: here), so that one
  // block barrier per tile suffices (session 16): a warp that finishes its scan early converts the next tile
  // while the others still scan this one (they read xf / bop of the other parity).
  auto convert = [&](int cp) {
    convert_x<T>(sm.raw[cp], sm.xf[cp], tid);
    if (tid < 12) {
      const int hr = tid / 4, part = tid % 4;
      *reinterpret_cast<float4*>(&sm.xf[cp][hr][part * 4]) =
          *reinterpret_cast<const float4*>(&sm.xf[cp ^ 1][kChunk + hr][part * 4]);
    }
    convert_b<T>(sm.raw[cp], sm.bop[cp], tid);
  };
  // raw[cp] holds the tile's copies, visible to every thread: TMA - the transaction barrier's phase (each thread
  // waits); cp.async - each thread's own copies, then a block barrier for the others'. kt counts the block's tiles
  // (over all its documents with kVar: the barriers' phases run on).
  auto wait_tile = [&](int kt) {
    if constexpr (kTma) {
      tma::wait(&sm.bar[kt & 1], (kt >> 1) & 1);  // raw[kt & 1]'s (kt / 2)-th fill
    } else {
      scan4::cp_async_wait_all();
      __syncthreads();
    }
  };

  int kbase = 0;  // the block's tiles before this document (kVar)
  for (bool first = true;; first = false) {
    // This document: tokens [ts, te) of sequence b, tiles tile_lo .. tile_hi - 1 (without kVar: the whole sequence).
    int ts = 0, te = L, tile_lo = 0, tile_hi = n_tiles;
    if constexpr (kVar) {
      if (!first) {
        item = take_document();
        if (item < 0) break;
      }
      const int4 doc = p.var_items[item];
      b = doc.x, ts = doc.y, te = doc.z;
      tile_lo = ts / kChunk, tile_hi = (te + kChunk - 1) / kChunk;
      if constexpr (kTma) {
        if (tid == 0)
          stage_tma<T>(p, maps, sm.raw[kbase & 1], &sm.bar[kbase & 1], b, head0, group, tile_lo * kChunk, n_heads);
      } else {
        stage<T>(p, sm.raw[kbase & 1], b, head0, group, tile_lo * kChunk, tid, n_heads);
        scan4::cp_async_commit();
      }
    }
    if constexpr (kVar) {
      init_h(ts == 0);
      init_halo(kbase & 1, ts == 0);
    }
    T* y = static_cast<T*>(p.y) + (int64_t)b * L * D;
    __syncthreads();  // the TMA barriers' initialisation and the first tile's conv halo before anyone reads them
    wait_tile(kbase);
    convert(kbase & 1);
    int Tv = 0;
    uint64_t starts = 0;  // kSeq: the document starts around the tile (doc_starts; after the loop: the last tile's)
    for (int tile = tile_lo; tile < tile_hi; ++tile) {
      const int kt = kbase + (tile - tile_lo);
      const int t0 = tile * kChunk, par = kt & 1;
      Tv = min(kChunk, L - t0);
      const typename SM::Raw& r = sm.raw[par];
#ifdef APRIEL_SCAN_BLOCK_TIMES
      if (!kVar && tid == 0) scan::block_time_mark(y + head0 * kN, tile, n_tiles);  // (y row 0: stored by tile 2)
#endif
      int2 doc_ids = make_int2(0, 0);  // kSeq: issued before the barrier, used after it
      if constexpr (kSeq) doc_ids = load_doc_ids(p, b, t0, lane);
      // The tile's one block barrier: its conversion (xf[par], bop[par]) is visible, and every reader of the previous
      // tile (raw / xf / bop [par ^ 1]) is done, so its buffers take the next tile.
      __syncthreads();
      if (tile + 1 < tile_hi) {
        if constexpr (kTma) {
          if (tid == 0) stage_tma<T>(p, maps, sm.raw[par ^ 1], &sm.bar[par ^ 1], b, head0, group, t0 + kChunk, n_heads);
        } else {
          stage<T>(p, sm.raw[par ^ 1], b, head0, group, t0 + kChunk, tid, n_heads);
          scan4::cp_async_commit();
        }
      }
      // checkpoint `tile` = the state after token t0 - 1: this document's when it holds that token (kVar)
      if (p.ckpt != nullptr && (!kVar || ts < t0 || ts == 0)) store_h(p.ckpt + ((int64_t)b * n_tiles + tile) * D * kN);
      if constexpr (kSeq) starts = doc_starts(doc_ids, lane);
      // (b, n_tiles, 3, D, 16): this tile's sub-chunk checkpoints, or nullptr
      float* const sub_rows = kSubCk ? p.ckpt_sub + ((int64_t)b * n_tiles + tile) * kSubCkptRows * D * kN : nullptr;

      if (has_head)  // (warps without a head: only the block barrier and the conversions)
  #pragma unroll 1
      for (int hf = 0; hf < 2; ++hf) {
        // Prep of tokens hf*16 .. +15 of this head: dt_proj on tensor cores, the rest per item in the layout.
        {
          unsigned a[4];
  #pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int row = hf * kHalf + g + (i & 1) * 8, k = (i >> 1) * 8 + 2 * q;
            a[i] = k < R ? *reinterpret_cast<const unsigned*>(&r.dt[row][k]) : 0u;
          }
          float dd[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
          M::run(dd[0], a, wb[0]);
          M::run(dd[1], a, wb[1]);
          // Items (token g + 8 rr, channel 4q + 2 nt + e) = dd[nt][2 rr + e]; kDocs: with the conv taps' and the
          // restart's document tests.
          auto items = [&](int rr, auto docs_tag) {
            constexpr bool kDocs = decltype(docs_tag)::value;
            const int tl = g + 8 * rr, t = hf * kHalf + tl;
            const bool live = t < Tv;
            float4 xs[4];
  #pragma unroll
            for (int k = 0; k < 4; ++k) xs[k] = *reinterpret_cast<const float4*>(&sm.xf[par][t + k][4 * q]);
            // kSeq: tap k (token t - 3 + k) counts only inside the token's document; keep = same document as the
            // previous token (else the decay argument is +inf: h restarts)
            bool tap[4] = {true, true, true, true}, keep = true;
            if constexpr (kDocs) doc_taps(starts, t, tap, keep);
            const uint2 zw = *reinterpret_cast<const uint2*>(&r.z[w][t][4 * q]);
            const float2 z01 = scan4::unpack2<T>(zw.x), z23 = scan4::unpack2<T>(zw.y);
            const float zv[4] = {z01.x, z01.y, z23.x, z23.y};
  #pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
              float dv[2], duv[2], sz[2], dus[2];
  #pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int j = 2 * nt + e;
                float cv = cbias[j];
  #pragma unroll
                for (int k = 0; k < 4; ++k) {
                  const float xv = j == 0 ? xs[k].x : j == 1 ? xs[k].y : j == 2 ? xs[k].z : xs[k].w;
                  cv = fmaf(cw[j][k], tap[k] ? xv : 0.f, cv);
                }
                // 4 MUFU ops per item (session 16): the two sigmoids share one reciprocal, softplus takes one ex2
                float s_cv, s_z;
                sigmoid_pair(cv, zv[j], s_cv, s_z);
                const float u = cv * s_cv;
                const float delta = softplus_poly(dd[nt][2 * rr + e] + dtb2[j]);
                dv[e] = live ? (keep ? delta : __int_as_float(0x7f800000)) : 0.f;  // past the end: (0, 0) keeps h
                duv[e] = live ? tf32_rna(delta * u) : 0.f;
                sz[e] = zv[j] * s_z;
                dus[e] = dsk[j] * u * sz[e];
              }
              sm.du[w][tl][2 * q + nt] = make_float4(duv[0], duv[1], dv[0], dv[1]);
              sm.gt[w][tl][2 * q + nt] = make_float4(sz[0], sz[1], dus[0], dus[1]);
            }
          };
  #pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            // kSeq (session 18): rows t + 1 .. t + 3 of this pass's 8 tokens (rows 16 hf + 8 rr + 1 .. + 10) hold no
            // document start in most tiles: a warp-uniform branch to the items without the conv taps' and the
            // restart's tests (the same values, bit for bit). Without documents only those are compiled. H100,
            // documents of ~1,000 tokens (bench/results/s18/ab_seq_prep/): b8 L4096 1.093-1.104 -> 1.087-1.088 ms, b1
            // L8192 (varlen) 0.369 -> 0.360-0.365.
            if constexpr (kSeq) {
              if (((starts >> (hf * kHalf + 8 * rr + 1)) & 0x3ffull) != 0) items(rr, std::true_type{});
              else items(rr, std::false_type{});
            } else {
              items(rr, std::false_type{});
            }
          }
          {  // C operand of the half: 8 token pairs x 4 quads, one per lane
            const int pr = lane / 4, qq = lane % 4;
            const unsigned* c0w = reinterpret_cast<const unsigned*>(&r.C[w][hf * kHalf + 2 * pr][0]);
            const unsigned* c1w = c0w + kN / 2;  // the next token's row
            sm.cop[w][pr][qq] = make_uint4(c0w[qq], c0w[4 + qq], c1w[qq], c1w[4 + qq]);
          }
        }
        __syncwarp();
        if constexpr (kSubCk) {  // and the states after tile tokens 7, 15, 23 (sub-chunk checkpoints j = 0, 1, 2)
          // kVar (session 31): a row is this document's when it holds the row's token (the sequence's last document
          // also writes the rows past its end: h kept there, as without kVar) - each row has one writer
          auto holds = [&](int tok) { return !kVar || (tok >= ts && (tok < te || te == L)); };
          float* const row = sub_rows + (int64_t)(2 * hf) * D * kN;
          scan_half<T, kSeq>(sm.du[w], sm.bop[par], hf * kHalf / 2, bsel, sm.cop[w], sm.yf[w], A2, h, g, q,
                             [&]() { if (holds(t0 + hf * kHalf + 7)) store_h(row); });
          if (hf == 0 && holds(t0 + 15)) store_h(row + (int64_t)D * kN);
        } else {
          scan_half<T, kSeq>(sm.du[w], sm.bop[par], hf * kHalf / 2, bsel, sm.cop[w], sm.yf[w], A2, h, g, q);
        }
        __syncwarp();
        {  // gate and store the half's y rows
          const int row = lane / 2, part = lane % 2, t = t0 + hf * kHalf + row;
          const uint4 out = gate_row<T>(sm.yf[w], sm.gt[w], row, part);
          if (kVar ? (t >= ts && t < te) : t < L) *reinterpret_cast<uint4*>(y + (int64_t)t * D + c0 + part * 8) = out;
        }
        __syncwarp();
      }
      if (tile + 1 < tile_hi) {  // the next tile's A (its copies were issued after this tile's barrier)
        wait_tile(kt + 1);
        convert(par ^ 1);
      }
    }
    const int kt_last = kbase + (tile_hi - 1 - tile_lo);  // the document's last tile (the loop ran at least once)
    kbase = kt_last + 1;
    if constexpr (kVar) {
      // A document that ends on a tile boundary before the sequence's end: the next tile's checkpoint is its state.
      if (te < L && te % kChunk == 0 && p.ckpt != nullptr)
        store_h(p.ckpt + ((int64_t)b * n_tiles + te / kChunk) * D * kN);
      if (te < L) continue;  // the final states are the sequence's last document's
    }
    store_h(p.final_ssm + (int64_t)b * D * kN);
    // Final conv state: the last W-1 x inputs (xf rows Tv+3-hw .. Tv+2 of the last tile), by the group's first block.
    const int hw = W - 1, last_par = kt_last & 1;
    if ((kPartial ? sub == 0 : head0 % p.heads_per_group == 0) && tid < kN * hw) {  // the group's first block
      const int ch = tid / hw, k = tid % hw, row = Tv + 3 - hw + k;
      bool same = true;  // kSeq: the last document's inputs only
      if constexpr (kSeq) same = no_start(starts, row + 1, Tv + 2 - row);  // rows row + 1 .. Tv + 2
      static_cast<T*>(p.final_conv)[((int64_t)b * p.d_xb + group * kN + ch) * hw + k] =
          from_f<T>(same ? sm.xf[last_par][row][ch] : 0.f);
    }
#ifdef APRIEL_SCAN_BLOCK_TIMES
    if (!kVar && tid == 0) scan::block_time_end(y + head0 * kN + kN, 0);  // (not the varlen kernel)
#endif
    if constexpr (!kVar) break;
  }
}

// Blocks per sequence (the grid's x): mixer_scan_v7_blocks_per_row (scan_params.h: ceil(heads_per_group / 4) per x / B
// group; each group's last block has warps without a head - the kernel's has_head - unless 4 divides it).
inline int blocks_per_row(const MixerScanParams& p) {
  static_assert(kHeads == 4 && kN == 16, "mixer_scan_v7_blocks_per_row's block shape");
  return mixer_scan_v7_blocks_per_row(p);
}

// Lets kernel use smem bytes of dynamic shared memory, with the largest shared-memory carveout (the v7 kernels run
// several blocks per SM). Called once per instantiation through a function-local static (thread-safe).
inline bool allow_smem(const void* kernel, size_t smem) {
  APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         (int)cudaSharedmemCarveoutMaxShared));
  return true;
}

// One launch of the kernel for (kSeq, kVar, kPartial) on grid (blocks_per_row, columns): columns = the batch, or with
// kVar the blocks per channel group that take documents from the plan's list.
template <typename T, bool kSeq, bool kVar = false, bool kPartial = false>
void launch_docs(const MixerScanParams& p, void* stream, int columns) {
  const size_t smem = sizeof(Smem7<T>);
  const dim3 grid(blocks_per_row(p), columns);
  tma::ScanMaps maps{};
#if APRIEL_TMA
  if (scan4::encode_scan_maps(p, maps)) {
    if constexpr (!(kVar && kPartial)) {
      if (p.ckpt_sub != nullptr) {  // (without CUTLASS none are written: their flag stays 0, the backward recomputes)
        static const bool configured_sub = allow_smem(
            reinterpret_cast<const void*>(mixer_scan_fwd7_kernel<T, true, kSeq, kVar, kPartial, true>), smem);
        (void)configured_sub;
        mixer_scan_fwd7_kernel<T, true, kSeq, kVar, kPartial, true>
            <<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p, maps);
        APRIEL_CHECK_LAUNCH();
        return;
      }
    }
    static const bool configured =
        allow_smem(reinterpret_cast<const void*>(mixer_scan_fwd7_kernel<T, true, kSeq, kVar, kPartial>), smem);
    (void)configured;
    mixer_scan_fwd7_kernel<T, true, kSeq, kVar, kPartial>
        <<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p, maps);
    APRIEL_CHECK_LAUNCH();
    return;
  }
#endif
  static const bool configured =
      allow_smem(reinterpret_cast<const void*>(mixer_scan_fwd7_kernel<T, false, kSeq, kVar, kPartial>), smem);
  (void)configured;
  mixer_scan_fwd7_kernel<T, false, kSeq, kVar, kPartial>
      <<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p, maps);
  APRIEL_CHECK_LAUNCH();
}

template <typename T>
void launch(const MixerScanParams& p, void* stream) {
  if (p.heads_per_group % kHeads != 0) {  // kPartial: instantiated in mixer_scan_fwd7p_*.cu (scan_params.h)
    launch_mixer_scan_fwd7_partial<T>(p, stream);
    return;
  }
  if (p.seq_idx != nullptr) launch_docs<T, true>(p, stream, p.batch);
  else launch_docs<T, false>(p, stream, p.batch);
}
template <typename T>
void launch_partial(const MixerScanParams& p, void* stream) {
  if (p.seq_idx != nullptr) launch_docs<T, true, false, true>(p, stream, p.batch);
  else launch_docs<T, false, false, true>(p, stream, p.batch);
}
template <typename T>
void launch_varlen(const MixerScanParams& p, int blocks_per_column, void* stream) {
  if (p.heads_per_group % kHeads != 0) {  // kPartial (session 23): instantiated in mixer_scan_fwd7p_*.cu
    launch_mixer_scan_fwd7_varlen_partial<T>(p, blocks_per_column, stream);
    return;
  }
  launch_docs<T, true, true>(p, stream, blocks_per_column);
}

}  // namespace scan7

template <typename T>
void launch_mixer_scan_fwd7(const MixerScanParams& p, void* stream) {
  scan7::launch<T>(p, stream);
}
#ifdef APRIEL_SCAN_V7_PARTIAL_TU  // (defined only in mixer_scan_fwd7p_*.cu: the other TUs link to their instances)
template <typename T>
void launch_mixer_scan_fwd7_partial(const MixerScanParams& p, void* stream) {
  scan7::launch_partial<T>(p, stream);
}
template <typename T>
void launch_mixer_scan_fwd7_varlen_partial(const MixerScanParams& p, int blocks_per_column, void* stream) {
  scan7::launch_docs<T, true, true, true>(p, stream, blocks_per_column);
}
#endif
template <typename T>
void launch_mixer_scan_fwd7_varlen(const MixerScanParams& p, int blocks_per_column, void* stream) {
  scan7::launch_varlen<T>(p, blocks_per_column, stream);
}

}  // namespace apriel
