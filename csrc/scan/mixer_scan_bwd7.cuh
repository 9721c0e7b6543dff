// Fused Apriel-H1 mixer scan, backward, v7: the forward v7's tensor-core layout applied to the adjoint (16-bit
// activations). Session 6; measurements in docs/notes/scan.md ("Session 6").
//
// Why a v7: the v4 backward (mixer_scan_bwd4.cuh: K = 8 lanes per channel, 2 states per thread) executes ~35
// instructions per (channel, state, token) element at 255 registers and 2 blocks per SM (33 % issue); it was ~7.3
// of the 9.7 ms of fwd+bwd at b8 L4096. v7 gives one WARP one head (16 channels x 16 states) in the mma
// accumulator layout of the forward v7 - lane (g = lane / 4, q = lane % 4) owns channels 2g, 2g + 1 (mma rows g,
// g + 8) x states {2q, 2q + 1, 8 + 2q, 9 + 2q} - and moves the state-dimension products to tensor cores:
//   recompute  h_t = a_t h_{t-1} + du_t (x) B_t      du (x) B: two tf32 mma.m16n8k4 (as the forward v7)
//              C_t . h_t (the readout, for dz)        two tf32 mma.m16n8k8 (h's registers as the A operand)
//   reverse    G_t = carry + dys_t (x) C_t            two m16n8k4 with the carry as the accumulator input
//              carry' = G_t a_t; q = carry' h_{t-1}; dA_log += q delta (x A at the end)
//              pu = sum_n G_t B_t   (d(delta u))      two m16n8k8 (A = G, B = B_t replicated in the columns)
//              pp = sum_n q A       (d delta, decay)  four m16n8k8 whose B columns are the A rows of the even / odd
//                                                     channels (the lane's own An registers): the diagonal entries
//                                                     land in lane q = g / 2
//              dB_t = sum_c G du, dC_t = sum_c dys h   channel sums: a 3-level shuffle reduce-scatter over the
//                                                     8 lanes of a column (8 values -> 1 per lane per token)
// Registers: one warp holds 8 elements per lane, so the recomputed states of a 32-token tile (256 per lane) do
// not fit. The tile is processed in 8-token sub-chunks: pass A recomputes tokens 0..23 from the checkpoint and
// keeps the states at the sub-chunk boundaries (shared memory); pass B takes the sub-chunks in reverse, recomputes
// 8 tokens into registers (hs[8][8]) and runs their adjoint. ex2 per element: 0.75 (pass A) + 1 + 1. Session 30
// (kSubCk, APRIEL_SCAN_CKPT=sub): where the forward saved the states after tokens 7, 15, 23 too, pass A loads them.
// Per (channel, token) work (prep: conv + silu, dt_proj by mma, softplus, silu(z) and the derivatives; epilogue:
// dz, d(dt_pre), D skip, conv weight / bias sums, transposed conv) is done per sub-chunk by the warp alone.
// Outputs (scan_api.cpp: mixer_scan_bwd_cuda):
//   - z / C slices of dzxbc, dA_log / D / conv / initial-state partials: as the v4 backward;
//   - dt_proj gradients in the kernel (p.ddt_low_part): d(dt_low) of each block's 64 channels by mma (the host sums
//     the d_inner / 64 blocks), d W_dt by mma over the tokens (split tf32: near fp32), sum_t d(dt_pre) per channel:
//     no fp32 (b, L, D) d(dt_pre) buffer and no GEMMs over it;
//   - heads_per_group == 4 (the block holds the whole x / B group, p.bwd_fused_sums): the block sums its heads'
//     d(conv input) and dB and writes dzxbc's x / B slices (adding dfinal_conv): no fp32 partial buffers, no
//     head-sum kernel; else (session 21) one fp32 part per (block, group): the sums of the block's heads of that
//     group, which the head-sum kernel adds over the group's blocks (v4 writes one part per head).
// Precision: du and dys enter the mmas rounded to tf32 (round to nearest), G / q / h are truncated to tf32 inside
// the state-sum mmas; the recurrences (h, carry) and every accumulation stay fp32.
// Latency (session 8): the recompute and the reverse issue each token's front - its operands, the dBu mmas and the
// exponentials, none of which depends on the h / carry chain - one token ahead of its update, as the forward v7 does:
// issue 42.8 -> 45.1 %, kernel 6.43 -> 6.02 ms at b8 L4096 (ncu, bench/results/s8/ncu/).
// Tried (session 6, bench/results/s6/two_warp/): two warps per head (one n-tile each, 128 registers, 2 blocks of 8
// warps per SM): 52 % issue but 24 % more instructions (per-warp fixed costs), bwd 7.07 vs 6.63 ms.
//
// Block = 4 consecutive heads of one x / B group (4 warps), one sequence, tiles in reverse order:
//   S1 wait cp.async + barrier; issue the copies of the tile before; A (block): x -> fp32 with the conv halo
//   (rows t0-3 .. t0-1, or the initial conv state), the B operand table;                      barrier S2
//   per warp: pass A (sub-chunks 0..2: prep (delta, du) + recompute -> boundary states);
//             pass B (sub-chunks 3..0: prep, recompute + readout, reverse, epilogue, transposed conv, dt_proj
//             mmas, dC stores; the group sums / d(dt_low) block sums between two block barriers).
// Sequence split (session 7; scan_params.h): batch x d_inner / 64 blocks leave the GPU half empty at batch 1-3
// (64 blocks at b1 D 4096: 5.4 ms vs v4's 2.4), so each sequence can run as bwd_segments segments of seg_tiles
// tiles (blockIdx.y = b * segments + s). A segment needs the adjoint carry entering it from the right: the carry
// pre-pass (mixer_scan_bwd7_carry_kernel, below) computes every later segment's local carry L and decay P, and
// the block folds them (K_s = L_{s+1} + P_{s+1} K_{s+1}) before its reverse. The forward state at the segment
// start is a checkpoint, the conv halo before it is read from zxbc as for any tile. What crosses a boundary the
// other way - the next segment's contribution to the d(conv input) of the hw tokens before it - leaves the kernel
// as that segment's dinit_conv_part row (and the earlier segment writes those rows without it: dx_edge / its parts);
// the host adds the two. Whole-sequence partial outputs get one row per (b, segment).
// Packed documents (seq_idx): kSeq (session 13), below. heads_per_group % 4 != 0: kSpan (session 20), below. One
// head per group (MHA teachers) where 4 divides the head count: kMulti (session 24, MultiSlot). Not handled (the
// dispatcher runs v4): fp32 activations, dt_rank > 16, rows that are not 16-byte aligned (zxbc, dt_low, dy), one head
// per group with a head count that 4 does not divide.
#pragma once
#include "../common/cuda_check.h"
#include "scan_common.cuh"
#include <type_traits>

#include "mixer_scan_fwd7.cuh"  // scan7:: stage, mma_k4, mma_k8, tf32_rna, convert_x / _b, Smem7::Raw
#include "../common/split_prepass.cuh"  // prepass:: the carry pre-pass's groups, barriers and fold
#include "mixer_scan_bwd7_core.cuh"  // scan7b:: recompute_sub, reverse_sub, mma_k4c, decays, kSub

namespace apriel {
namespace scan7b {

using scan::from_f;
using scan::kChunk;
using scan::kLog2e;
using scan::kN;
using scan::to_f;
using scan7::kHeads;
using scan7::kThreads;
using scan7::mma_k4;
using scan7::mma_k8;
using scan7::tf32_rna;

// The entry of channel c (of a head's 16) in the per-channel constant tables SmemB7::Warp::cw / cp.
__device__ __forceinline__ int chan_slot(int c) { return 4 * (c & 3) + (c >> 2); }

template <typename T>
struct SmemB7 {
  struct Raw {
    typename scan7::Smem7<T>::Raw f;     // x, B, dt (the group's), z, C (4 heads): the forward v7's staging
    alignas(16) T dy[kHeads][kChunk][kN];
    alignas(16) T xh[4][kN];             // x rows t0-3 .. t0-1 (row 3 unused)
  };
  struct Warp {                          // one head's sub-chunk items; [t][c] = (sub-chunk token, channel)
    alignas(16) float4 cop4[kSub / 2][9];  // C as the k4 B operand per token pair: (C_t[g], C_t[8+g], C_t+1[g],
                                           // C_t+1[8+g]); entry 8 = zeros (lanes q > 0)
    alignas(16) float2 du[kSub][kN];       // (tf32(delta u), delta); 0 past the sequence end
    alignas(16) float dys[kSub][kN];       // tf32(dy silu(z))
    alignas(16) float u[kSub][kN];         // silu(conv)
    alignas(16) float dsc[kSub][kN];       // silu'(conv pre-activation)
    alignas(16) float dsp[kSub][kN];       // softplus'(dt_pre + 2 b_dt)
    alignas(16) float dzf[kSub][kN];       // dy silu'(z)
    alignas(16) float yc[kSub][kN];        // readout C . h
    alignas(16) float4 ppu[kSub][8];       // (pp, pp, pu, pu) of channels 2g, 2g + 1
    alignas(16) float red[kSub][32];       // per token: dB (states 0..15) then dC (16..31) of the head
    alignas(16) float dxs[kSub][kN];       // d(conv input) of the head (fused head sums only)
    alignas(16) float ddt[kSub][kN];       // d(dt_pre) (0 past the sequence end)
    alignas(16) float dlow[kSub][kN];      // d(dt_low) of the sub-chunk from this head's channels
    // [fragment][lane] (session 28: [lane][fragment] put lanes 0, 4, 8, .. on one bank - 4-way conflicts per access)
    alignas(16) float2 dw[4][32];          // d W_dt accumulator fragments per lane (m16n8 x 2 n-tiles)
    alignas(16) float2 wfr[4][32];         // W_dt as B fragments (k = channel, n = rank) per lane: [k-step][n-tile]
    alignas(16) float dco[kSub + 3][kN];   // d(conv pre-activation); rows 8..10 = the next sub-chunk's rows 0..2
    alignas(16) float4 bst[kNSub - 1][2][32];  // states after tokens 7, 15, 23 of the tile, per lane (pass A)
    // channel c at entry chan_slot(c): the prep's lanes read channels 4 q + jj (q = 0..3) at once, 4 consecutive
    // entries, one bank group each (session 28: in channel order two of them shared banks)
    alignas(16) float4 cw[kN];             // right-aligned conv taps per channel
    alignas(16) float4 cp[kN];             // (conv bias, 2 b_dt, D, 0) per channel
  };
  // By tile parity: the raw copies and what A (block) makes of them (see "A (block)" in the kernel; kSeq uses
  // tile[0]'s xf / bop only). xf / bop sit next to raw so that one base register addresses all three (as
  // separate arrays by parity they cost ptxas registers and spills: 255 registers, 12-24 bytes of spills).
  struct alignas(128) Tile {                     // 128: the TMA destinations in raw
    Raw raw;
    alignas(16) float xf[kChunk + 3][kN];        // conv input fp32; row i = position t0 - 3 + i
    alignas(16) float4 bop[kChunk / 2][9];       // B as the k4 B operand per token pair; entry 8 = zeros
  };
  Tile tile[2];
  Warp wp[kHeads];
  alignas(8) uint64_t bar[2];                    // TMA staging: the transaction barrier of raw[parity]
};
// kSeq (packed documents, session 13): the true delta per (head, sub-chunk token, channel) - du's delta is FLT_MAX at
// a document start (the decay restarts) and the epilogue needs the value. The document ids themselves never reach
// shared memory: each warp turns them into a bit mask of the document starts around its tile (doc_starts).
template <typename T>
struct SmemB7Seq : SmemB7<T> {
  alignas(16) float dlr[kHeads][kSub][kN];
};
template <typename T, bool kSeq>
using SmemB7For = std::conditional_t<kSeq, SmemB7Seq<T>, SmemB7<T>>;
// kSpan (heads_per_group % 4 != 0, >= 2; session 20): a block's 4 consecutive heads may belong to two x / B groups.
// The second group's slices (x, B, the x halo rows) and what A (block) makes of them, by tile parity, next to the
// first group's in SmemB7::Tile. The TMA destinations x, B and xh sit at 128-byte aligned offsets.
template <typename T>
struct alignas(128) SpanSlot {
  alignas(16) T x[kChunk][kN];
  alignas(16) T B[kChunk][kN];
  alignas(16) T xh[4][kN];                     // x rows t0-3 .. t0-1 (row 3 unused)
  alignas(16) float xf[kChunk + 3][kN];
  alignas(16) float4 bop[kChunk / 2][9];
};
template <typename Base, typename T>
struct WithSpan : Base {
  SpanSlot<T> span[2];
};
// kMulti (one head per x / B group, 4 | heads; session 24): a block's 4 heads are 4 groups. Group 0's x / B / halo
// arrive in the raw tile as ever; groups 1-3's are read from global memory by A (block) at the tile's top (L2
// prefetched a tile ahead), which keeps their B rows (bf16, the reverse's sum_n G B) and converts xf / bop into one
// parity: group 1 into tile[1]'s (free: A runs at the tile's top, as with kSeq, so tile[0]'s serve group 0), groups 2
// and 3 into MultiSlot. (Both parities of all 4 groups, as kSpan's slots: ~40 KB more than 2 blocks per SM allow.)
struct alignas(16) MultiSlot {
  alignas(16) float xf[kChunk + 3][kN];
  alignas(16) float4 bop[kChunk / 2][9];
};
template <typename Base, typename T>
struct WithMulti : Base {
  MultiSlot multi[2];                  // groups 2, 3
  alignas(16) T Bm[3][kChunk][kN];     // groups 1-3's B rows of the tile
};
template <typename T, bool kSeq, bool kSpan, bool kMulti = false>
using SmemB7Of = std::conditional_t<kSpan, WithSpan<SmemB7For<T, kSeq>, T>,
                                    std::conditional_t<kMulti, WithMulti<SmemB7For<T, kSeq>, T>, SmemB7For<T, kSeq>>>;
// 2 blocks per SM (the launch bounds): 228 KB of shared memory per SM, less the 1 KB the runtime reserves per block
static_assert(sizeof(SmemB7Of<__nv_bfloat16, true, true>) + 1024 <= 233472 / 2, "SmemB7 + span: 2 blocks per SM");
static_assert(sizeof(SmemB7Of<__nv_bfloat16, true, false, true>) + 1024 <= 233472 / 2, "SmemB7 + multi: 2 per SM");
static_assert(offsetof(SpanSlot<__nv_bfloat16>, B) % 128 == 0 && offsetof(SpanSlot<__nv_bfloat16>, xh) % 128 == 0,
              "SpanSlot: TMA destinations 128-byte aligned");

// (kSeq's document starts: scan_common.cuh)
using scan::doc_starts;
using scan::doc_taps;
using scan::load_doc_ids;
using scan::no_start;

// The tile starting at t0: the forward v7's 11 slices, plus dy of the 4 heads and the 3 x rows before t0.
template <typename T>
__device__ __forceinline__ void stage(const MixerScanParams& p, typename SmemB7<T>::Raw& r, int b, int head0,
                                      int group, int t0, int tid, int n_heads = kHeads) {
  constexpr int kVec = 16 / sizeof(T);
  scan7::stage<T>(p, r.f, b, head0, group, t0, tid, n_heads);
  const T* dyb = static_cast<const T*>(p.dy) + (int64_t)b * p.seqlen * p.d_inner + head0 * kN;
#pragma unroll
  for (int k = 0; k < 2; ++k) {  // 4 heads x 32 rows x 2 parts = 256 copies
    const int i = tid + k * kThreads, hh = i >> 6, row = (i >> 1) & 31, part = i & 1, pos = t0 + row;
    const bool ok = pos < p.seqlen && (n_heads == kHeads || hh < n_heads);  // (zero-filled: see scan7::stage)
    scan4::cp_async16(&r.dy[hh][row][part * kVec], ok ? dyb + (int64_t)pos * p.d_inner + hh * kN + part * kVec : dyb, ok);
  }
  if (tid < 6) {
    const int row = tid >> 1, part = tid & 1, pos = t0 - 3 + row;
    const bool ok = pos >= 0;
    const T* zx = static_cast<const T*>(p.zxbc) + (int64_t)b * p.zxbc_batch_stride;
    const T* src = zx + (ok ? (int64_t)pos * p.zxbc_row_stride + p.d_inner + group * kN + part * kVec : 0);
    scan4::cp_async16(&r.xh[row][part * kVec], src, ok);
  }
}

// The same tile by the bulk tensor copy engine (kTma), issued by one thread as the forward v7's stage_tma: the 11
// forward slices, dy of the 4 heads, and the x rows t0-3 .. t0 (a 4-row box: rows before 0 read as zeros, row t0 is
// not used) - 16 boxes on raw's barrier.
// kSpan: also the second group's x, B and halo boxes into sp (group1), on the same barrier - when the block's heads
// span two groups (group1 != group; block-uniform), else nothing more.
template <typename T, bool kSpan = false>
__device__ __forceinline__ void stage_tma(const MixerScanParams& p, const tma::ScanBwdMaps& maps,
                                          typename SmemB7<T>::Raw& r, uint64_t* bar, int b, int head0, int group,
                                          int t0, int n_heads = kHeads, SpanSlot<T>* sp = nullptr, int group1 = 0) {
  using Raw = typename SmemB7<T>::Raw;
  static_assert(sizeof(T) == 2 && tma::kBoxCols == kN && tma::kBoxRows == kChunk, "one box = one 16-bit slice");
  static_assert(offsetof(Raw, dy) == 11 * kChunk * kN * sizeof(T) && offsetof(Raw, xh) % 128 == 0 &&
                sizeof(Raw) % 128 == 0, "16 boxes at 128-byte aligned offsets");
  const bool span = kSpan && group1 != group;
  tma::expect_bytes(bar, sizeof(Raw) + (span ? (2 * kChunk + 4) * kN * sizeof(T) : 0));
  scan7::load_slices<T>(p, maps.fwd, r.f, bar, b, head0, group, t0,
                        [&](int hh) {
                          tma::load_box(maps.dy, bar, &r.dy[hh][0][0], (head0 + (hh < n_heads ? hh : 0)) * kN, t0, b);
                        }, n_heads);
  tma::load_box(maps.halo, bar, &r.xh[0][0], p.d_inner + group * kN, t0 - 3, b);
  if (span) {
    const int cx = p.d_inner + group1 * kN;
    tma::load_box(maps.fwd.zxbc, bar, &sp->x[0][0], cx, t0, b);
    tma::load_box(maps.fwd.zxbc, bar, &sp->B[0][0], cx + p.d_xb, t0, b);
    tma::load_box(maps.halo, bar, &sp->xh[0][0], cx, t0 - 3, b);
  }
}

// kSpan, cp.async staging: the second group's x and B rows of the tile (one 16-byte copy per thread) and its 3 x rows
// before t0.
template <typename T>
__device__ __forceinline__ void stage_span(const MixerScanParams& p, SpanSlot<T>& sp, int b, int group1, int t0,
                                           int tid) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(kThreads == 2 * kChunk * 2, "one copy per thread: 2 slices x 32 rows x 2 parts");
  const T* zx = static_cast<const T*>(p.zxbc) + (int64_t)b * p.zxbc_batch_stride;
  {
    const int slice = tid >> 6, row = (tid >> 1) & 31, part = tid & 1, pos = t0 + row;
    const bool ok = pos < p.seqlen;
    const int64_t col = p.d_inner + slice * p.d_xb + group1 * kN + part * kVec;
    const T* src = zx + (ok ? (int64_t)pos * p.zxbc_row_stride + col : 0);
    scan4::cp_async16(slice ? &sp.B[row][part * kVec] : &sp.x[row][part * kVec], src, ok);
  }
  if (tid < 6) {
    const int row = tid >> 1, part = tid & 1, pos = t0 - 3 + row;
    const bool ok = pos >= 0;
    const T* src = zx + (ok ? (int64_t)pos * p.zxbc_row_stride + p.d_inner + group1 * kN + part * kVec : 0);
    scan4::cp_async16(&sp.xh[row][part * kVec], src, ok);
  }
}

// kTma: the tiles arrive by the bulk tensor copy engine (stage_tma) instead of cp.async (stage).
// kSeq: packed documents (p.seq_idx; session 13): conv taps into another document masked in the prep, the epilogue's
// conv-weight sums, the transposed conv and the initial-conv-state rows; the decay argument FLT_MAX at a document
// start, so the recompute restarts h there and the reverse's carry into the token before is exactly 0 (a = 0: MUFU's
// ex2 flushes ex2(FLT_MAX x A2) - -inf, or below -126 where |A2| < 1 - to +0), as is q = G a h_{t-1}, and dA_log's
// sum q x delta stays finite. (Session 18: FLT_MAX instead of the forward's +inf - the same decays, bitwise - saves
// the reverse a min(delta, FLT_MAX) per element: 0 x inf would be NaN.)
// kSpan (heads_per_group % 4 != 0 and >= 2, session 20): a block takes 4 consecutive heads wherever the group
// boundaries fall, so they belong to one or two x / B groups (group, group1: the first and the last head's), and
// every warp has a head except in the last block when the head count is not a multiple of 4. The tile holds both
// groups' x / B slices (the second in SpanSlot), A (block) converts both, and each warp reads its own group's. The
// group sums of dB / d(conv input) then cross blocks: one part per (block, group) (except below). 8, 12, ... heads per
// group run this kernel too (no block holds two groups there; session 21), so the kernel without kSpan is r = 4's.
// Session 19's kPartial instead spread a group's heads over its own blocks with warps left idle (3 + 2 heads for 5
// per group: 5 of 8 warps busy), which lost to v4 at 1, 2 and 5 heads per group. Warps without a head stage, convert
// and take part in the block sums (their d(dt_low) rows are not read), alias the block's first head for their
// constants and skip pass A, pass B's per-warp work and every store. The group sums of dB / d(conv input) stay in the
// kernel (fused) only at 2 heads per group when 4 divides the head count: each block then holds two whole groups.
// kSubCk (session 30): the forward's sub-chunk checkpoints replace pass A. The host launches the kSubCk kernel and then
// the other one where they may exist (p.ckpt_sub_in); each reads the flag the forward left and returns at once unless
// it is the one to run (a device-side choice: CUDA graphs replay it). A template flag, not a runtime branch: the
// branch raised the pass-A kernel's registers (250 -> 255) and cost it ~5 % (bench/results/s30/).
template <typename T, bool kTma, bool kSeq = false, bool kSpan = false, bool kMulti = false, bool kSubCk = false>
__global__ void __launch_bounds__(kThreads, 2)
    mixer_scan_bwd7_kernel(MixerScanParams p, const __grid_constant__ tma::ScanBwdMaps maps) {
  static_assert(!(kSpan && kMulti), "one head per group has its own kernel");
  if constexpr (kSubCk) {
    if (*p.ckpt_sub_flag_in == 0.f) return;  // the forward did not write them: the pass-A kernel runs
  } else {
    if (p.ckpt_sub_in != nullptr && *p.ckpt_sub_flag_in != 0.f) return;  // the kSubCk kernel ran
  }
  extern __shared__ __align__(128) unsigned char smem_raw[];  // 128: TMA destinations
  using SM = SmemB7Of<T, kSeq, kSpan, kMulti>;
  using M = scan4::MmaOp<T>;
  SM& sm = *reinterpret_cast<SM*>(smem_raw);
  const int tid = threadIdx.x, lane = tid % 32, w = tid / 32, g = lane / 4, q = lane % 4;
  // blockIdx.y = b * segments + segment (vb: the row of the whole-sequence partial outputs)
  const int S = p.bwd_segments, vb = blockIdx.y, b = vb / S, seg = vb - b * S;
  int head0 = blockIdx.x * kHeads, group = head0 / p.heads_per_group, n_heads = kHeads;
  int group1 = group, wgroup = group;  // kSpan: the last head's group; this warp's group
  if constexpr (kSpan) n_heads = min(kHeads, p.d_inner / kN - head0);
  const bool has_head = !kSpan || w < n_heads;
  const int head = head0 + (has_head ? w : 0), c0 = head * kN;
  if constexpr (kSpan) {
    group1 = (head0 + n_heads - 1) / p.heads_per_group;
    wgroup = head / p.heads_per_group;
  }
  if constexpr (kMulti) wgroup = head;  // (one head per group)
  const bool slot1 = kSpan && wgroup != group;  // this warp reads the SpanSlot's x / B
  const int D = p.d_inner, L = p.seqlen, R = p.dt_rank, W = p.width, hw = W - 1;
  const int n_tiles = p.n_chunks;
  const int tile_first = seg * p.seg_tiles, tile_last = min(n_tiles, tile_first + p.seg_tiles) - 1;
  const int64_t rowZ = 2 * (int64_t)D + 2 * p.d_xb;
  typename SM::Warp& wp = sm.wp[w];
  float* dlr = nullptr;  // kSeq: this warp's true deltas [sub-chunk token][channel]
  if constexpr (kSeq) dlr = &sm.dlr[w][0][0];

  // the tile at t0 into raw / span [par]
  auto stage_tile = [&](int par, int t0) {
    if constexpr (kTma) {
      if constexpr (kSpan) {
        stage_tma<T, true>(p, maps, sm.tile[par].raw, &sm.bar[par], b, head0, group, t0, n_heads, &sm.span[par],
                           group1);
      } else {
        stage_tma<T>(p, maps, sm.tile[par].raw, &sm.bar[par], b, head0, group, t0, n_heads);
      }
    } else {
      stage<T>(p, sm.tile[par].raw, b, head0, group, t0, tid, n_heads);
      if constexpr (kSpan)
        if (group1 != group) stage_span<T>(p, sm.span[par], b, group1, t0, tid);  // (block-uniform)
      scan4::cp_async_commit();
    }
  };
  if constexpr (kTma) {
    if (tid == 0) {
      tma::init_barriers(sm.bar);
      stage_tile(tile_last & 1, tile_last * kChunk);
    }
  } else {
    stage_tile(tile_last & 1, tile_last * kChunk);
  }

  // Per-channel constants (smem: the registers go to the recomputed states), zero operand entries, dco halo.
  if (lane < kN) {
    const int pc = c0 + lane, wch = p.repeat_before_conv ? pc : wgroup * kN + lane;
    float cw[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int src = i - (4 - W);
      cw[i] = src >= 0 ? p.conv_w[wch * W + src] : 0.f;
    }
    wp.cw[chan_slot(lane)] = make_float4(cw[0], cw[1], cw[2], cw[3]);
    const float cb = p.conv_b != nullptr ? p.conv_b[wch] : 0.f;
    wp.cp[chan_slot(lane)] = make_float4(cb, 2.f * p.dt_b[pc], p.Dskip[pc], 0.f);
  }
  if (lane < kSub / 2) wp.cop4[lane][8] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (p.ddt_low_part != nullptr) {
    // d(dt_low)[t][k] = sum_c ddt[t][c] W[c][k]: B fragments (k = channel 8 ks + q (+4), n = rank 8 nt + g)
#pragma unroll
    for (int ks = 0; ks < 2; ++ks)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int k = 8 * nt + g;
        const float w0 = k < R ? p.dt_w[(int64_t)(c0 + 8 * ks + q) * R + k] : 0.f;
        const float w1 = k < R ? p.dt_w[(int64_t)(c0 + 8 * ks + q + 4) * R + k] : 0.f;
        wp.wfr[2 * ks + nt][lane] = make_float2(tf32_rna(w0), tf32_rna(w1));
        wp.dw[2 * ks + nt][lane] = make_float2(0.f, 0.f);
      }
  }
  for (int i = lane; i < 3 * kN; i += 32) wp.dco[kSub + i / kN][i % kN] = 0.f;  // past the sequence end
  if (tid < kChunk) sm.tile[tid / (kChunk / 2)].bop[tid % (kChunk / 2)][8] = make_float4(0.f, 0.f, 0.f, 0.f);
  if constexpr (kSpan)
    if (tid < kChunk) sm.span[tid / (kChunk / 2)].bop[tid % (kChunk / 2)][8] = make_float4(0.f, 0.f, 0.f, 0.f);
  if constexpr (kMulti)
    if (tid < kChunk) sm.multi[tid / (kChunk / 2)].bop[tid % (kChunk / 2)][8] = make_float4(0.f, 0.f, 0.f, 0.f);
  // dt_proj B fragments (the forward v7's column labels: lane q's prep items are channels 4q .. 4q + 3).
  unsigned wb[2][2];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int k = hf * 8 + 2 * q;
      const int64_t row = (int64_t)(c0 + 4 * (g >> 1) + 2 * nt + (g & 1)) * R;
      wb[nt][hf] = M::pack(k < R ? p.dt_w[row + k] : 0.f, k + 1 < R ? p.dt_w[row + k + 1] : 0.f);
    }
  // Scan constants / state: element [nt][i] = channel 2g + (i >> 1), state 8 nt + 2q + (i & 1).
  float An[2][4], A2[2][4], carry[2][4], dAacc[2][4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int cs = c0 + 2 * g + (i >> 1), n = nt * 8 + 2 * q + (i & 1);
      An[nt][i] = -__expf(p.A_log[cs * kN + n]);
      A2[nt][i] = An[nt][i] * kLog2e;
      carry[nt][i] = p.dfinal_ssm != nullptr ? p.dfinal_ssm[((int64_t)b * D + cs) * kN + n] : 0.f;
      dAacc[nt][i] = 0.f;
    }
  // Epilogue mapping: channel ec, tokens eh, eh + 2, eh + 4, eh + 6 of the sub-chunk; per-channel sums over the
  // sequence. (Session 28: the half warps on consecutive tokens - rows 64 bytes apart, other banks; with tokens
  // 0..3 / 4..7 they read and wrote rows 256 bytes apart, 2-way conflicts on every fp32 item array.)
  const int ec = lane & 15, eh = lane >> 4;
  float accD = 0.f, accCB = 0.f, accDB = 0.f, accW[4] = {0.f, 0.f, 0.f, 0.f};
  // v7 always computes the dt_proj gradients in the kernel (the host passes ddt_low_part; ddt_pre is unused): a
  // compile-time constant since session 21, as `fused` is without kSpan (the kernel for 4 heads per group: 250
  // instead of 255 registers, -2 to -4 % at L 4096, bench/results/s21/).
  constexpr bool dt_fused = true;
  const int bsel = q == 0 ? g : 8;  // lanes q > 0 read the zero entry: rows k >= 1 of a k4 B operand
  const RevLane rl = rev_lane(lane);  // the reverse's per-lane constants
  // (the host fuses at 4 heads per group, and with kSpan at 2 when 4 divides the head count: whole groups per block)
  const bool fused = !kSpan || p.bwd_fused_sums;  // (launch: without kSpan, 4 heads per group)
  T* dzx = static_cast<T*>(p.dzxbc) + (int64_t)b * L * rowZ;
  // The group sums of dB (hx 0: red) or d(conv input) (hx 1: dxs) over warps w0 .. w1 - 1 in order (deterministic):
  // token tl, channel / state pair pr. Both the fused sums and the group parts use it.
  auto warps_sum = [&](int hx, int tl, int pr, int w0, int w1, float& s0, float& s1) {
    s0 = 0.f;
    s1 = 0.f;
#pragma unroll
    for (int ww = 0; ww < kHeads; ++ww) {
      if (ww < w0 || ww >= w1) continue;
      const float2 v = hx == 0 ? *reinterpret_cast<const float2*>(&sm.wp[ww].red[tl][2 * pr])
                               : *reinterpret_cast<const float2*>(&sm.wp[ww].dxs[tl][2 * pr]);
      s0 += v.x;
      s1 += v.y;
    }
  };
  // Sequence split: the carry entering this segment's last token, from the pre-pass's (L, P) of the later
  // segments (fixed order: deterministic).
  for (int s2 = S - 1; s2 > seg; --s2) {
    const float* lp = p.seg_carry + (((int64_t)b * S + s2) * 2) * D * kN;
    float lv[2][4], pv[2][4];
    load_state(lp, c0, g, q, lv);
    load_state(lp + (int64_t)D * kN, c0, g, q, pv);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) carry[nt][i] = fmaf(pv[nt][i], carry[nt][i], lv[nt][i]);
  }

  // A (block) of a tile: x -> fp32 with the halo rows (the raw tile's xh, or the initial conv state), the B operand
  // table. kLateA (session 16): into the tile's parity, at the END of the tile after it (the loop runs backwards; the
  // first tile: before the loop), so that the next S1 covers it and no S2 is needed. A/B
  // (bench/results/s16/ab_bwd7_late_a/): bwd7 b8 L4096 5.68 vs 5.85-5.95 ms, b1 L8192 1.45 vs 1.50 - but with
  // documents 6.42 vs 6.23-6.25 ms, so kSeq keeps A between S1 and S2 at the tile's top, into tile[0]'s xf / bop
  // (measured again in session 18 after the changes below: late A with documents 6.37-6.40 vs 6.16 ms at b8,
  // bench/results/s18/ab_seq_epilogue/). (Also measured, slower everywhere: A before sub-chunk 0's closing barrier of
  // the fused sums, which then served as S1 too - 255 registers and spills.)
  constexpr bool kLateA = !kSeq && !kMulti;  // (kMulti: one parity of xf / bop, see MultiSlot)
  // One group's A: x rows -> xf rows 3 .. 34, the halo rows 0 .. 2 (the raw tile's xh, or the initial conv state of
  // group grp for the first tile), the B operand table.
  // halo row hr (< 3) of the first tile: the initial conv state of group grp, channel ch (0 without one)
  auto init_conv_row = [&](int grp, int hr, int ch) {
    const int kk = hw + hr - 3;  // index into the last W-1 entries of the initial conv state
    return (p.init_conv != nullptr && kk >= 0) ? p.init_conv[((int64_t)b * p.d_xb + grp * kN + ch) * hw + kk] : 0.f;
  };
  auto convert_group = [&](int tile, const T (*x)[kN], const T (*xh)[kN], const T (*Bt)[kN], int grp, float (*xf)[kN],
                           float4 (*bo)[9]) {
    scan7::convert_x<T>(x, xf, tid);
    if (tid < 3 * kN) {
      const int hr = tid / kN, ch = tid % kN;
      xf[hr][ch] = tile > 0 ? to_f(xh[hr][ch]) : init_conv_row(grp, hr, ch);
    }
    scan7::convert_b<T>(Bt, bo, tid);
  };
  // kMulti: groups 1-3's x / B columns of this sequence (at one head per group the block's 4 groups are contiguous)
  const T* zx_groups = static_cast<const T*>(p.zxbc) + (int64_t)b * p.zxbc_batch_stride + p.d_inner + group * kN;
  // kMulti: A of groups 1-3 (group + 1 .. + 3) from global memory - every load first (in convert_x / convert_b's
  // thread mapping), then the conversions by their code - into xf / bop, and their bf16 B rows (Bm, which convert_b
  // then reads: each thread its own 4 entries); zeros past the sequence end (as the raw tile's zero fill).
  auto convert_groups_global = [&](int tile) {
    if constexpr (kMulti) {  // (the members below exist only then)
      const int t0 = tile * kChunk;
      const int xrow = tid / 4, xpart = tid % 4, bpr = tid / 8, bg = tid % 8, hr = tid / kN, hch = tid % kN;
      uint2 xv[3];
      T bv[3][4];
      float hv[3];
#pragma unroll
      for (int s = 0; s < 3; ++s) {
        const T* zg = zx_groups + (s + 1) * kN;
        const int pos = t0 + xrow;
        xv[s] = pos < L ? *reinterpret_cast<const uint2*>(zg + (int64_t)pos * p.zxbc_row_stride + xpart * 4)
                        : make_uint2(0u, 0u);
#pragma unroll
        for (int k = 0; k < 4; ++k) {  // B[2 bpr + (k >> 1)][bg + 8 (k & 1)]: convert_b's entries of this thread
          const int bpos = t0 + 2 * bpr + (k >> 1);
          bv[s][k] = bpos < L ? zg[(int64_t)bpos * p.zxbc_row_stride + p.d_xb + bg + 8 * (k & 1)] : from_f<T>(0.f);
        }
        hv[s] = 0.f;
        if (tid < 3 * kN)
          hv[s] = tile > 0 ? to_f(zg[(int64_t)(t0 - 3 + hr) * p.zxbc_row_stride + hch])
                           : init_conv_row(group + s + 1, hr, hch);
      }
#pragma unroll
      for (int s = 0; s < 3; ++s) {
        float(*xf)[kN] = s == 0 ? sm.tile[1].xf : sm.multi[s - 1].xf;
        scan7::store_x_quad<T>(xv[s], xf, tid);
        if (tid < 3 * kN) xf[hr][hch] = hv[s];
        T(*Bm)[kN] = sm.Bm[s];
#pragma unroll
        for (int k = 0; k < 4; ++k) Bm[2 * bpr + (k >> 1)][bg + 8 * (k & 1)] = bv[s][k];
        scan7::convert_b<T>(Bm, s == 0 ? sm.tile[1].bop : sm.multi[s - 1].bop, tid);
      }
    }
  };
  // kMulti: the L2 prefetch of groups 1-3's x / B rows of the tile at t0 (and its 3 halo rows): one 128-byte line per
  // row and slice holds the block's 4 groups; lines 0 .. 34 = x rows t0 - 3 .. t0 + 31, 35 .. 66 = B rows t0 ..
  // t0 + 31.
  auto prefetch_groups = [&](int t0) {
    if (tid < 67) {
      const int pos = tid < 35 ? t0 - 3 + tid : t0 + tid - 35;
      if (pos >= 0 && pos < L) {
        const T* line = zx_groups + (int64_t)pos * p.zxbc_row_stride + (tid < 35 ? 0 : p.d_xb);
        asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
      }
    }
  };
  auto convert = [&](int tile) {
    const int cp = tile & 1;
    const typename SM::Raw& rc = sm.tile[cp].raw;
    auto& dst = sm.tile[kLateA ? cp : 0];
    convert_group(tile, rc.f.x, rc.xh, rc.f.B, group, dst.xf, dst.bop);
    if constexpr (kSpan) {
      if (group1 != group) {  // (block-uniform)
        const SpanSlot<T>& rs = sm.span[cp];
        SpanSlot<T>& ds = sm.span[kLateA ? cp : 0];
        convert_group(tile, rs.x, rs.xh, rs.B, group1, ds.xf, ds.bop);
      }
    }
    if constexpr (kMulti) convert_groups_global(tile);
  };
  // raw[tile & 1] holds the tile's copies (TMA: the transaction barrier's phase, waited on by each thread; cp.async:
  // each thread's own copies, then - block_sync - a block barrier for the others' (else the caller's S1 does it)).
  auto wait_tile = [&](int tile, bool block_sync) {
    if constexpr (kTma) {
      tma::wait(&sm.bar[tile & 1], ((tile_last - tile) >> 1) & 1);  // raw[par]'s fills alternate phases
    } else {
      scan4::cp_async_wait_all();
      if (block_sync) __syncthreads();
    }
  };
  __syncthreads();  // the TMA barriers' initialisation before anyone waits on them
  if constexpr (kLateA) {
    wait_tile(tile_last, true);
    convert(tile_last);
  }
  // kSeq: the ids around a tile are loaded a tile ahead (in the tile after it: the loop runs backwards) and used after
  // its S2 (session 14 A/B: -1.5 % against loading them at the tile's top)
  int2 next_doc_ids = make_int2(0, 0);
  if constexpr (kSeq) next_doc_ids = load_doc_ids(p, b, tile_last * kChunk, lane);
#ifdef APRIEL_SCAN_BLOCK_TIMES
  // (dz of the segment's last row: stored in the block's first tile)
  T* const bt_row = dzx + (int64_t)(min(L, (tile_last + 1) * kChunk) - 1) * rowZ + head0 * kN;
#endif
  for (int tile = tile_last; tile >= tile_first; --tile) {
#ifdef APRIEL_SCAN_BLOCK_TIMES
    if (tid == 0) scan::block_time_mark(bt_row, tile_last - tile, tile_last - tile_first + 1);
#endif
    const int t0 = tile * kChunk, par = tile & 1, Tv = min(kChunk, L - t0);
    const typename SM::Raw& r = sm.tile[par].raw;
    int2 doc_ids = make_int2(0, 0);
    if constexpr (kSeq) {
      doc_ids = next_doc_ids;
      next_doc_ids = load_doc_ids(p, b, t0 - kChunk, lane);
    }
    if constexpr (!kLateA) wait_tile(tile, false);  // this tile's copies (S1 below makes the cp.async ones the block's)
    // S1: every reader of the tile after it is done, so raw[par ^ 1] takes the tile before; kLateA: this tile's
    // conversion (xf / bop [par]) is visible; the first tile: the prologue's per-channel constants are visible
    __syncthreads();
    if (tile > tile_first) {
      if constexpr (kTma) {
        if (tid == 0) stage_tile(par ^ 1, t0 - kChunk);
      } else {
        stage_tile(par ^ 1, t0 - kChunk);
      }
    }
    if constexpr (kMulti) {
      if (tile > tile_first) prefetch_groups(t0 - kChunk);
    }
    if constexpr (!kLateA) {
      convert(tile);
      __syncthreads();  // S2
    }
    const float (*xf)[kN] = sm.tile[kLateA ? par : 0].xf;
    const float4 (*bop)[9] = sm.tile[kLateA ? par : 0].bop;
    const T (*Braw)[kN] = r.f.B;  // this warp's group's B rows (the reverse's sum_n G B)
    if constexpr (kSpan) {
      if (slot1) {
        xf = sm.span[kLateA ? par : 0].xf;
        bop = sm.span[kLateA ? par : 0].bop;
        Braw = sm.span[par].B;
      }
    }
    if constexpr (kMulti) {  // warp w's group is the block's w-th (MultiSlot)
      if (w > 0) {
        xf = w == 1 ? sm.tile[1].xf : sm.multi[w - 2].xf;
        bop = w == 1 ? sm.tile[1].bop : sm.multi[w - 2].bop;
        Braw = sm.Bm[w - 1];
      }
    }
    // kSeq: tap k of token t (row t + 3) reads another document iff a start lies in rows t + k + 1 .. t + 3, and
    // input t feeds output t + 3 - k iff none lies in rows t + 4 .. t + 6 - k.
    uint64_t starts = 0;
    if constexpr (kSeq) starts = doc_starts(doc_ids, lane);
    auto tap_bits = [&](int row) { return (unsigned)(starts >> row) & 7u; };  // bit k = a start at row row + k

    // Prep of sub-chunk j (tile tokens 8j .. 8j + 7): lane (g, q) = token 8j + g, channels 4q .. 4q + 3.
    // kFull: also the reverse / epilogue items and the C operand table; else (delta, du) only (pass A).
    // (Session 18: a copy without the document tests for sub-chunks whose taps' rows hold no start - as the epilogue
    // below does - measured 1-2 % slower, bench/results/s18/ab_seq_prep/.)
    auto prep = [&](int j, auto full_tag) {
      constexpr bool kFull = decltype(full_tag)::value;
      const int tl = g, t = kSub * j + tl;
      const bool live = t < Tv;
      unsigned a[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int k = (i >> 1) * 8 + 2 * q;  // rows g and g + 8 of the m16 tile both hold token t
        a[i] = k < R ? *reinterpret_cast<const unsigned*>(&r.f.dt[t][k]) : 0u;
      }
      float dd[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      M::run(dd[0], a, wb[0]);
      M::run(dd[1], a, wb[1]);
      float4 xs[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) xs[k] = *reinterpret_cast<const float4*>(&xf[t + k][4 * q]);
      // kSeq: tap k (token t - 3 + k) counts only inside the token's document; keep = same document as the previous
      // token (else the decay argument is FLT_MAX: h restarts)
      bool tap[4] = {true, true, true, true}, keep = true;
      if constexpr (kSeq) doc_taps(starts, t, tap, keep);
      float zv[4], dyv[4];
      if constexpr (kFull) {
        const uint2 zw = *reinterpret_cast<const uint2*>(&r.f.z[w][t][4 * q]);
        const uint2 dw = *reinterpret_cast<const uint2*>(&r.dy[w][t][4 * q]);
        const float2 z01 = scan4::unpack2<T>(zw.x), z23 = scan4::unpack2<T>(zw.y);
        const float2 d01 = scan4::unpack2<T>(dw.x), d23 = scan4::unpack2<T>(dw.y);
        zv[0] = z01.x; zv[1] = z01.y; zv[2] = z23.x; zv[3] = z23.y;
        dyv[0] = d01.x; dyv[1] = d01.y; dyv[2] = d23.x; dyv[3] = d23.y;
      }
      float o_du[4], o_dl[4], o_dys[4], o_u[4], o_dsc[4], o_dsp[4], o_dzf[4], o_dr[4];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const float4 cwv = wp.cw[chan_slot(4 * q + jj)], cpv = wp.cp[chan_slot(4 * q + jj)];
        auto comp = [&](const float4& v) { return jj == 0 ? v.x : jj == 1 ? v.y : jj == 2 ? v.z : v.w; };
        float cv = cpv.x;
        cv = fmaf(cwv.x, tap[0] ? comp(xs[0]) : 0.f, cv);
        cv = fmaf(cwv.y, tap[1] ? comp(xs[1]) : 0.f, cv);
        cv = fmaf(cwv.z, tap[2] ? comp(xs[2]) : 0.f, cv);
        cv = fmaf(cwv.w, comp(xs[3]), cv);
        const float sc = sigmoid_fast(cv), u = cv * sc;
        const float dp = dd[jj >> 1][jj & 1] + cpv.y;
        const float delta = scan4::softplus_select(dp);
        o_du[jj] = live ? tf32_rna(delta * u) : 0.f;
        o_dl[jj] = live ? (keep ? delta : 3.402823466e38f) : 0.f;  // (kSeq: FLT_MAX at a start, see the kernel)
        o_dr[jj] = delta;
        if constexpr (kFull) {
          const float zz = zv[jj], sz = sigmoid_fast(zz);
          o_dys[jj] = tf32_rna(dyv[jj] * zz * sz);  // the G mma's operand; 0 past the end (dy rows zero-filled)
          o_dzf[jj] = dyv[jj] * sz * (1.f + zz * (1.f - sz));
          o_u[jj] = u;
          o_dsc[jj] = sc * (1.f + cv * (1.f - sc));
          o_dsp[jj] = dp > 20.f ? 1.f : sigmoid_fast(dp);
        }
      }
      *reinterpret_cast<float4*>(&wp.du[tl][4 * q]) = make_float4(o_du[0], o_dl[0], o_du[1], o_dl[1]);
      *reinterpret_cast<float4*>(&wp.du[tl][4 * q + 2]) = make_float4(o_du[2], o_dl[2], o_du[3], o_dl[3]);
      if constexpr (kFull && kSeq)  // the true delta for the epilogue (du's is FLT_MAX at a document start)
        *reinterpret_cast<float4*>(dlr + tl * kN + 4 * q) = make_float4(o_dr[0], o_dr[1], o_dr[2], o_dr[3]);
      if constexpr (kFull) {
        *reinterpret_cast<float4*>(&wp.dys[tl][4 * q]) = make_float4(o_dys[0], o_dys[1], o_dys[2], o_dys[3]);
        *reinterpret_cast<float4*>(&wp.u[tl][4 * q]) = make_float4(o_u[0], o_u[1], o_u[2], o_u[3]);
        *reinterpret_cast<float4*>(&wp.dsc[tl][4 * q]) = make_float4(o_dsc[0], o_dsc[1], o_dsc[2], o_dsc[3]);
        *reinterpret_cast<float4*>(&wp.dsp[tl][4 * q]) = make_float4(o_dsp[0], o_dsp[1], o_dsp[2], o_dsp[3]);
        *reinterpret_cast<float4*>(&wp.dzf[tl][4 * q]) = make_float4(o_dzf[0], o_dzf[1], o_dzf[2], o_dzf[3]);
        const int pr = lane >> 3, gg = lane & 7, tc = kSub * j + 2 * pr;  // C operand: 4 pairs x 8 entries
        wp.cop4[pr][gg] = make_float4(to_f(r.f.C[w][tc][gg]), to_f(r.f.C[w][tc][gg + 8]), to_f(r.f.C[w][tc + 1][gg]),
                                      to_f(r.f.C[w][tc + 1][gg + 8]));
      }
    };

    const float* ck = p.ckpt_in + ((int64_t)b * n_tiles + tile) * D * kN;
    // Pass A: the states after tokens 7, 15, 23 (only the sub-chunks before the last one are needed) - the forward's
    // sub-chunk checkpoints where it wrote them (session 30), else recomputed from the tile's checkpoint.
    if constexpr (kSubCk) {
      if (has_head) {
        static_assert(kNSub - 1 == kSubCkptRows, "a sub-chunk checkpoint at every sub-chunk start but the first");
        const float* cs = p.ckpt_sub_in + ((int64_t)b * n_tiles + tile) * (kNSub - 1) * D * kN;
#pragma unroll
        for (int j = 0; j < kNSub - 1; ++j) {
          float h[2][4];
          load_state(cs + (int64_t)j * D * kN, c0, g, q, h);
          store_sub_state(wp.bst, j, lane, h);
        }
        __syncwarp();
      }
    } else if (has_head) {
      float h[2][4], hs_unused[kSub][2][4];
      load_state(ck, c0, g, q, h);
#pragma unroll 1
      for (int j = 0; j < kNSub - 1; ++j) {
        prep(j, std::false_type{});
        __syncwarp();
        recompute_sub<T, false>(j, wp.du, bop, bsel, r.f.C[w], wp.yc, A2, h, hs_unused, g, q);
        store_sub_state(wp.bst, j, lane, h);
        __syncwarp();
      }
    }

    // Pass B: sub-chunks in reverse.
#pragma unroll 1
    for (int j = kNSub - 1; j >= 0; --j) {
      if (has_head) {  // (kSpan: warps without a head go to the block sums)
        prep(j, std::true_type{});
        float hstart[2][4];
        sub_start_state(wp.bst, j, lane, ck, c0, g, q, hstart);
        __syncwarp();
        float hs[kSub][2][4];
        recompute_kept<T>(j, wp.du, bop, bsel, r.f.C[w], wp.yc, A2, hstart, hs, g, q);

        // Reverse over the sub-chunk's tokens.
        reverse_sub<T>(j, wp, Braw, rl, A2, An, hs, hstart, carry, dAacc, g, q);
        __syncwarp();

        // kSeq (session 18): a sub-chunk whose rows 8j + 1 .. 8j + 13 (the conv taps of its tokens and of the
        // transposed conv's 3 tokens after it) hold no document start runs the epilogue and the transposed conv
        // without the taps' document tests (a warp-uniform branch to a copy; the values are the same bit for bit).
        // The kernels without documents compile the original block alone (their SASS is unchanged). bwd7 kernel,
        // packed documents of ~1,000 tokens (bench/results/s18/ab_seq_epilogue/, bitwise the same gradients): b8
        // L4096 6.156 -> 5.940 ms, b1 L8192 1.572 -> 1.503, b1 L4096 0.785 -> 0.757. (As a lambda called with the
        // document tests on or off, the kernels without documents got another schedule: hence the textual copy.)
        bool epilogue_done = false;
        if constexpr (kSeq) {
          if (((starts >> (kSub * j + 1)) & 0x1fffull) == 0) {
            {
              const float4 cpv = wp.cp[chan_slot(ec)];
              const float Dc = cpv.z;
              // this lane's first token of the sub-chunk (row pointers advanced per token, as below)
              const int tg0 = t0 + kSub * j + eh;
              T* dz_ptr = dzx + (int64_t)tg0 * rowZ + c0 + ec;
#pragma unroll
              for (int i = 0; i < 4; ++i, dz_ptr += 2 * rowZ) {
                const int tl = eh + 2 * i, t = kSub * j + tl;
                const float4 pq4 = wp.ppu[tl][ec >> 1];
                const float pp = (ec & 1) ? pq4.y : pq4.x, pu = (ec & 1) ? pq4.w : pq4.z;
                float delta = wp.du[tl][ec].y;
                if constexpr (kSeq) delta = dlr[tl * kN + ec];
                const float u = wp.u[tl][ec], dys = wp.dys[tl][ec];
                const float yfull = fmaf(Dc, u, wp.yc[tl][ec]);
                const float dz = yfull * wp.dzf[tl][ec];
                const float ddt = fmaf(u, pu, pp) * wp.dsp[tl][ec];
                const float dut = fmaf(delta, pu, dys * Dc);
                const bool live = t < Tv;
                const float dco = live ? dut * wp.dsc[tl][ec] : 0.f;
                wp.dco[tl][ec] = dco;
                wp.ddt[tl][ec] = live ? ddt : 0.f;
                if (live) {
                  accD = fmaf(dys, u, accD);
                  accCB += dco;
                  accDB += ddt;
#pragma unroll
                  for (int k = 0; k < 4; ++k) accW[k] = fmaf(dco, xf[t + k][ec], accW[k]);
                  *dz_ptr = from_f<T>(dz);
                }
              }
            }
            __syncwarp();
            {  // transposed conv: d(conv input) at token t = sum_i w[i] dco[t + 3 - i]
              const float4 cwv = wp.cw[chan_slot(ec)];
              const float wv[4] = {cwv.x, cwv.y, cwv.z, cwv.w};
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                const int tl = eh + 2 * i;
                float acc = 0.f;
#pragma unroll
                for (int k = 0; k < 4; ++k) acc = fmaf(wv[k], wp.dco[tl + 3 - k][ec], acc);
                wp.dxs[tl][ec] = acc;  // (the block sums it: the fused group sums or the group parts)
              }
            }
            epilogue_done = true;
          }
        }
        if (!epilogue_done) {
          // Epilogue per (channel ec, token): dz, d(dt_pre), d(conv pre-activation), per-channel sums.
          {
            const float4 cpv = wp.cp[chan_slot(ec)];
            const float Dc = cpv.z;
            // this lane's first token of the sub-chunk: row pointers advanced per token (no 64-bit index math per
            // store)
            const int tg0 = t0 + kSub * j + eh;
            T* dz_ptr = dzx + (int64_t)tg0 * rowZ + c0 + ec;
#pragma unroll
            for (int i = 0; i < 4; ++i, dz_ptr += 2 * rowZ) {
              const int tl = eh + 2 * i, t = kSub * j + tl;
              const float4 pq4 = wp.ppu[tl][ec >> 1];
              const float pp = (ec & 1) ? pq4.y : pq4.x, pu = (ec & 1) ? pq4.w : pq4.z;
              float delta = wp.du[tl][ec].y;
              if constexpr (kSeq) delta = dlr[tl * kN + ec];
              const float u = wp.u[tl][ec], dys = wp.dys[tl][ec];
              const float yfull = fmaf(Dc, u, wp.yc[tl][ec]);
              const float dz = yfull * wp.dzf[tl][ec];
              const float ddt = fmaf(u, pu, pp) * wp.dsp[tl][ec];
              const float dut = fmaf(delta, pu, dys * Dc);
              const bool live = t < Tv;
              const float dco = live ? dut * wp.dsc[tl][ec] : 0.f;
              wp.dco[tl][ec] = dco;
              wp.ddt[tl][ec] = live ? ddt : 0.f;
              if (live) {
                accD = fmaf(dys, u, accD);
                accCB += dco;
                accDB += ddt;
                unsigned tb = 0;  // kSeq: the forward's masked taps get no weight gradient
                if constexpr (kSeq) tb = tap_bits(t + 1);
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                  bool tap = true;
                  if constexpr (kSeq) tap = (tb >> k) == 0;  // rows t + k + 1 .. t + 3 (k = 3: always)
                  if (tap) accW[k] = fmaf(dco, xf[t + k][ec], accW[k]);
                }
                *dz_ptr = from_f<T>(dz);
              }
            }
          }
          __syncwarp();
          {  // transposed conv: d(conv input) at token t = sum_i w[i] dco[t + 3 - i]
            const float4 cwv = wp.cw[chan_slot(ec)];
            const float wv[4] = {cwv.x, cwv.y, cwv.z, cwv.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int tl = eh + 2 * i, t = kSub * j + tl;
              float acc = 0.f;
              unsigned tb = 0;  // kSeq: output token t + 3 - k reads input t at tap k only inside t's document
              if constexpr (kSeq) tb = tap_bits(t + 4);
#pragma unroll
              for (int k = 0; k < 4; ++k) {
                bool tap = true;
                if constexpr (kSeq) tap = (tb & ((1u << (3 - k)) - 1u)) == 0;  // rows t + 4 .. t + 6 - k
                if (tap) acc = fmaf(wv[k], wp.dco[tl + 3 - k][ec], acc);
              }
              wp.dxs[tl][ec] = acc;
            }
          }
        }
        {
          // gradient of the initial conv state: positions -hw .. -1 (16 hw <= 48 items); in a segment s >= 1: its
          // contribution to the d(conv input) of the hw tokens before it (the host adds it to segment s - 1's rows)
          if (tile == tile_first && j == 0) {
            for (int di = lane; di < kN * hw; di += 32) {
              const int ch = di / hw, kk = di % hw, pos = kk - hw;
              const float4 cw2 = wp.cw[chan_slot(ch)];
              const float w2[4] = {cw2.x, cw2.y, cw2.z, cw2.w};
              float acc = 0.f;
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                const int row = pos + 3 - i;
                if (row >= 0 && row < Tv) {
                  bool tap = true;  // kSeq: no start in rows pos + 4 .. row + 3 (position pos = row pos + 3)
                  if constexpr (kSeq) tap = no_start(starts, pos + 4, row - pos);
                  if (tap) acc = fmaf(w2[i], wp.dco[row][ch], acc);
                }
              }
              p.dinit_conv_part[((int64_t)vb * D + c0 + ch) * hw + kk] = acc;
            }
          }
        }
        __syncwarp();
        for (int i = lane; i < 3 * kN; i += 32) wp.dco[kSub + i / kN][i % kN] = wp.dco[i / kN][i % kN];
        if (dt_fused) {
          __syncwarp();  // ddt of the sub-chunk complete
          // d W_dt[c][k] += sum_t ddt[t][c] dt_low[t][k]: A = ddt^T (rows = channels g / g + 8, k = tokens q / q + 4)
          // split hi + lo, B = dt_low (k = tokens, n = rank 8 nt + g), exact in tf32; accumulators in smem (lane's
          // own).
          float ah[4], al[4];
          tf32_split(wp.ddt[q][g], ah[0], al[0]);
          tf32_split(wp.ddt[q][g + 8], ah[1], al[1]);
          tf32_split(wp.ddt[q + 4][g], ah[2], al[2]);
          tf32_split(wp.ddt[q + 4][g + 8], ah[3], al[3]);
          // d(dt_low)[t][k] (this head's channels): A = ddt (rows = tokens g, rows g + 8 zero; k = channels), split
          float bh[2][4], bl[2][4];
#pragma unroll
          for (int ks = 0; ks < 2; ++ks) {
            tf32_split(wp.ddt[g][8 * ks + q], bh[ks][0], bl[ks][0]);
            tf32_split(wp.ddt[g][8 * ks + q + 4], bh[ks][2], bl[ks][2]);
            bh[ks][1] = bh[ks][3] = bl[ks][1] = bl[ks][3] = 0.f;
          }
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const int t = kSub * j;
            const float d0 = to_f(r.f.dt[t + q][8 * nt + g]), d1 = to_f(r.f.dt[t + q + 4][8 * nt + g]);
            const float2 c01 = wp.dw[nt][lane], c23 = wp.dw[2 + nt][lane];
            float acc[4] = {c01.x, c01.y, c23.x, c23.y};
            mma_k8c(acc, ah, d0, d1);
            mma_k8c(acc, al, d0, d1);
            wp.dw[nt][lane] = make_float2(acc[0], acc[1]);
            wp.dw[2 + nt][lane] = make_float2(acc[2], acc[3]);
            float lo[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
              const float2 wf = wp.wfr[2 * ks + nt][lane];
              mma_k8c(lo, bh[ks], wf.x, wf.y);
              mma_k8c(lo, bl[ks], wf.x, wf.y);
            }
            *reinterpret_cast<float2*>(&wp.dlow[g][8 * nt + 2 * q]) = make_float2(lo[0], lo[1]);  // rows g < 8 only
          }
        }
        const int64_t row0 = (int64_t)b * L + t0 + kSub * j;  // first (b, L) row of the sub-chunk
        if (lane < 16) {  // dC of the head (complete): token lane / 2, states 8 (lane % 2) .. + 7, one 16-byte store
          const int tl = lane >> 1, hf = lane & 1;
          const float4 lo = *reinterpret_cast<const float4*>(&wp.red[tl][16 + 8 * hf]);
          const float4 hi = *reinterpret_cast<const float4*>(&wp.red[tl][20 + 8 * hf]);
          if (kSub * j + tl < Tv)
            *reinterpret_cast<uint4*>(dzx + (row0 - (int64_t)b * L + tl) * rowZ + D + 2 * p.d_xb + c0 + 8 * hf) =
                make_uint4(M::pack(lo.x, lo.y), M::pack(lo.z, lo.w), M::pack(hi.x, hi.y), M::pack(hi.z, hi.w));
        }
        if (fused) {
          // The group's 4 heads are this block's 4 warps: sum their dB and d(conv input) (fixed order) and write
          // dzxbc's B / x slices. dfinal_conv enters at the last width-1 positions (x inputs of the final state).
          // kSpan (fused only at 2 heads per group with 4 heads in every block - the host's rule): the block holds
          // two whole groups, warps 0-1 and 2-3, summed in turn; kMulti: four, one warp each.
          __syncthreads();
          const int hx = tid >> 6, i = tid & 63, tl = i >> 3, pr = i & 7, tg = t0 + kSub * j + tl;
          constexpr int kSlots = kSpan ? 2 : kMulti ? 4 : 1, kPerGroup = kHeads / kSlots;
#pragma unroll
          for (int sl = 0; sl < kSlots; ++sl) {
            const int gs = group + sl;
            float s0, s1;
            warps_sum(hx, tl, pr, sl * kPerGroup, (sl + 1) * kPerGroup, s0, s1);
            // kSeq: the final conv state holds the last document's inputs only: no start in rows tg - t0 + 4 .. L - 1 -
            // t0 + 3 (at most 2 rows, all <= 37). (tg < L: rows past the end read nothing - session 13's memcheck
            // without the caching allocator found the reads past dfinal_conv that this bound used to allow.)
            if (hx == 1 && p.dfinal_conv != nullptr && tg >= L - hw && tg < L &&
                (!kSeq || no_start(starts, tg - t0 + 4, L - 1 - tg))) {
              const float* dfc = p.dfinal_conv + ((int64_t)b * p.d_xb + gs * kN + 2 * pr) * hw + (tg - (L - hw));
              s0 += dfc[0];
              s1 += dfc[hw];
            }
            // a segment's last hw x rows lack the next segment's halo contribution: fp32 to dx_edge (the host adds it)
            const int seg_end = min(L, (tile_last + 1) * kChunk), edge = tg - (seg_end - hw);
            if (hx == 1 && seg < S - 1 && edge >= 0) {
              *reinterpret_cast<float2*>(p.dx_edge + ((int64_t)vb * hw + edge) * p.d_xb + gs * kN + 2 * pr) =
                  make_float2(s0, s1);
            } else if (tg < L) {
              *reinterpret_cast<unsigned*>(dzx + (int64_t)tg * rowZ + D + (hx == 0 ? p.d_xb : 0) + gs * kN + 2 * pr) =
                  M::pack(s0, s1);
            }
          }
        }
      }  // has_head
      if (!fused) {
        // Group parts (session 21): the block's heads of each x / B group it holds summed in head order (dB from red,
        // d(conv input) from dxs) into part blockIdx.x + group of dB_part / dx_part ((b, L, bwd_parts, 16) fp32).
        // A group's parts are consecutive and its blocks' order; the head-sum kernel adds them (deterministic) with
        // dfinal_conv and a segment's halo rows. Was one fp32 row per head (r rows per group; ~0.3 ms of traffic
        // at b8 L4096 for r = 3, bench/results/s20).
        __syncthreads();
        const int hx = tid >> 6, i = tid & 63, tl = i >> 3, pr = i & 7, tg = t0 + kSub * j + tl;
        float* dst = (hx == 0 ? p.dB_part : p.dx_part) + ((int64_t)b * L + tg) * p.bwd_parts * kN + 2 * pr;
        // warps [0, split) hold heads of `group`, [split, n_heads) of group1 (kSpan; none past n_heads)
        const int split = kSpan ? min(n_heads, (group + 1) * p.heads_per_group - head0) : kHeads;
#pragma unroll
        for (int sl = 0; sl < (kSpan ? 2 : 1); ++sl) {
          const int w0 = sl == 0 ? 0 : split, w1 = sl == 0 ? split : n_heads;
          if (w0 < w1) {  // (block-uniform)
            float s0, s1;
            warps_sum(hx, tl, pr, w0, w1, s0, s1);
            if (tg < L)
              *reinterpret_cast<float2*>(dst + (int64_t)(blockIdx.x + (sl == 0 ? group : group1)) * kN) =
                  make_float2(s0, s1);
          }
        }
      }
      if (dt_fused) {  // d(dt_low) summed over the block's 4 heads (fixed order; kSpan: its n_heads)
        const int tl = tid >> 4, k = tid & 15, tg = t0 + kSub * j + tl;
        float s;
        if constexpr (kSpan) {  // (the 4-head sum stays written out: as a loop it rescheduled the kernels without
                                // kSpan, SASS compared in session 19)
          s = sm.wp[0].dlow[tl][k];
#pragma unroll
          for (int ww = 1; ww < kHeads; ++ww)
            if (ww < n_heads) s += sm.wp[ww].dlow[tl][k];
        } else {
          s = sm.wp[0].dlow[tl][k] + sm.wp[1].dlow[tl][k] + sm.wp[2].dlow[tl][k] + sm.wp[3].dlow[tl][k];
        }
        if (tg < L) p.ddt_low_part[(((int64_t)b * L + tg) * gridDim.x + blockIdx.x) * kN + k] = s;
      }
      __syncthreads();  // red / dxs / dlow are rewritten by the next sub-chunk
    }
    if (kLateA && tile > tile_first) {  // the tile before's A (its copies were issued after this tile's S1)
      wait_tile(tile - 1, true);
      convert(tile - 1);
    }
  }

  // Whole-sequence outputs.
  if (!has_head) return;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int r2 = 0; r2 < 2; ++r2) {
      const int64_t o = ((int64_t)vb * D + c0 + 2 * g + r2) * kN + nt * 8 + 2 * q;
      *reinterpret_cast<float2*>(p.dA_log_part + o) =
          make_float2(dAacc[nt][2 * r2] * An[nt][2 * r2], dAacc[nt][2 * r2 + 1] * An[nt][2 * r2 + 1]);
      *reinterpret_cast<float2*>(p.dinit_ssm + o) = make_float2(carry[nt][2 * r2], carry[nt][2 * r2 + 1]);
    }
  if (dt_fused) {  // d W_dt rows c0 + g / g + 8, ranks 8 nt + 2q, + 1; sum_t d(dt_pre) per channel
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int r2 = 0; r2 < 2; ++r2) {
        const float2 v = wp.dw[2 * r2 + nt][lane];
        float* dst = p.ddt_w_part + ((int64_t)vb * D + c0 + g + 8 * r2) * kN + 8 * nt + 2 * q;
        dst[0] = v.x;
        dst[1] = v.y;
      }
    accDB += __shfl_xor_sync(0xffffffffu, accDB, 16);
    if (lane < kN) p.ddt_b_part[(int64_t)vb * D + c0 + ec] = accDB;
  }
  accD += __shfl_xor_sync(0xffffffffu, accD, 16);
  accCB += __shfl_xor_sync(0xffffffffu, accCB, 16);
#pragma unroll
  for (int i = 0; i < 4; ++i) accW[i] += __shfl_xor_sync(0xffffffffu, accW[i], 16);
  if (lane < kN) {
    const int64_t c = (int64_t)vb * D + c0 + ec;
    p.dD_part[c] = accD;
    p.dconv_b_part[c] = accCB;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int src = i - (4 - W);
      if (src >= 0) p.dconv_w_part[c * W + src] = accW[i];
    }
  }
#ifdef APRIEL_SCAN_BLOCK_TIMES
  if (tid == 0) scan::block_time_end(bt_row + kN, seg);
#endif
}

// Tensor maps for stage_tma; false where TMA cannot run here or the encoder refuses a tensor (cp.async then).
// (internal linkage: tma::usable differs between TMA and non-TMA TUs)
namespace {
inline bool encode_maps(const MixerScanParams& p, tma::ScanBwdMaps& maps) {
  return scan4::encode_scan_maps(p, maps.fwd) &&
         tma::encode_rows16(&maps.halo, p.zxbc, p.batch, p.seqlen, 2 * (int64_t)p.d_inner + 2 * p.d_xb,
                            p.zxbc_row_stride, p.zxbc_batch_stride, 4) &&
         tma::encode_rows16(&maps.dy, p.dy, p.batch, p.seqlen, p.d_inner, p.d_inner, (int64_t)p.seqlen * p.d_inner);
}
}  // namespace

template <typename T, bool kSeq, bool kSpan, bool kMulti = false>
void launch_for(const MixerScanParams& p, void* stream) {
  const size_t smem = sizeof(SmemB7Of<T, kSeq, kSpan, kMulti>);
  const dim3 grid(mixer_scan_bwd7_blocks_per_row(p), p.batch * p.bwd_segments);
  tma::ScanBwdMaps maps{};
#if APRIEL_TMA
  if (encode_maps(p, maps)) {
    // The kSubCk kernel first; the one after it returns at once if that one ran. Not for kMulti (one head per group:
    // its forward is v5 at the shapes measured, so the instantiations' build time would buy nothing; pass A runs).
    MixerScanParams q = p;
    if constexpr (kMulti) {
      q.ckpt_sub_in = nullptr;
    } else if (p.ckpt_sub_in != nullptr) {
      static const bool configured_sub = scan7::allow_smem(
          reinterpret_cast<const void*>(mixer_scan_bwd7_kernel<T, true, kSeq, kSpan, kMulti, true>), smem);
      (void)configured_sub;
      mixer_scan_bwd7_kernel<T, true, kSeq, kSpan, kMulti, true>
          <<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p, maps);
      APRIEL_CHECK_LAUNCH();
    }
    static const bool configured =
        scan7::allow_smem(reinterpret_cast<const void*>(mixer_scan_bwd7_kernel<T, true, kSeq, kSpan, kMulti>), smem);
    (void)configured;
    mixer_scan_bwd7_kernel<T, true, kSeq, kSpan, kMulti>
        <<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(q, maps);
    APRIEL_CHECK_LAUNCH();
    return;
  }
#endif
  // (cp.async staging, a build without CUTLASS: pass A always)
  MixerScanParams q = p;
  q.ckpt_sub_in = nullptr;
  static const bool configured =
      scan7::allow_smem(reinterpret_cast<const void*>(mixer_scan_bwd7_kernel<T, false, kSeq, kSpan, kMulti>), smem);
  (void)configured;
  mixer_scan_bwd7_kernel<T, false, kSeq, kSpan, kMulti>
      <<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(q, maps);
  APRIEL_CHECK_LAUNCH();
}

template <typename T>
void launch(const MixerScanParams& p, void* stream) {
  // kMulti (one head per group; instantiated in mixer_scan_bwd7m_*.cu) and kSpan (mixer_scan_bwd7s_*.cu; scan_params.h)
  // - kSpan also for 8, 12, ... heads per group (blocks inside one group: no second-group staging): the kernel without
  // either always has the group sums fused (4 per group).
  if (p.heads_per_group == 1) {
    launch_mixer_scan_bwd7_multi<T>(p, stream);
    return;
  }
  if (p.heads_per_group % kHeads != 0 || !p.bwd_fused_sums) {
    launch_mixer_scan_bwd7_span<T>(p, stream);
    return;
  }
  if (p.seq_idx != nullptr) launch_for<T, true, false>(p, stream);
  else launch_for<T, false, false>(p, stream);
}
template <typename T>
void launch_span(const MixerScanParams& p, void* stream) {
  if (p.seq_idx != nullptr) launch_for<T, true, true>(p, stream);
  else launch_for<T, false, true>(p, stream);
}
template <typename T>
void launch_multi(const MixerScanParams& p, void* stream) {
  if (p.seq_idx != nullptr) launch_for<T, true, false, true>(p, stream);
  else launch_for<T, false, false, true>(p, stream);
}

}  // namespace scan7b

// The carry pre-pass of the sequence split (p.bwd_segments > 1; see scan_params.h). For every segment s >= 1 of
// every sequence: L_s = the adjoint carry at the segment's start given a zero carry at its end (the reverse
// G_t = carry + dys_t (x) C_t, carry = G_t exp(delta_t A) over the segment's tokens) and P_s = exp(A sum_t delta_t).
// Its work is ~(segments - 1) / segments of a forward scan without readout (one ex2 per element). The block of
// segment s of the main kernel combines the (L, P) of the later segments into its starting carry.
// Block = one head (16 channels x 16 states) of one segment, kGroups groups of 64 threads, each over its own
// contiguous range of the segment's tiles (the block folds the groups' (L, P) at the end: a segment is thus
// processed kGroups-way parallel; one group alone was latency-bound at ~7 us per tile). Per group and 32-token
// tile (reverse order; session 12: pipelined, one group barrier per tile - see "Pipelined schedule" below): C by
// 16-byte cp.async (the v7 alignment guarantees), delta / dys per (token, channel) into shared memory (dt_proj by
// one m16n8k16 pair per warp from z / dy / dt_low loaded straight into its lane mapping, the items in its
// accumulator layout - session 11; before, a 16-term CUDA-core dot per item), while each thread runs its 4
// recurrences (channel tid / 4, states 4 (tid % 4) .. + 3) over the tile before.
// delta is computed as the main kernel's prep does (the same mma on W rounded to the activation dtype, + the
// double bias, softplus_select); dys is fp32 here (tf32 in the main kernel's mma: the carry differs by ~1e-4
// relative).
namespace scan7c {

// (../common/split_prepass.cuh; session 12: 8 groups of half the tiles each, 2 blocks per SM: not faster)
using prepass::kGroups;
using prepass::kGT;
using prepass::kThr;

// A group's buffers, by tile parity (z / dy / dt_low go from global memory to registers): 10 KB per group, 45 KB per
// block of 4 groups with the fold arrays (4 blocks per SM).
template <typename T>
struct GroupSmem {
  alignas(16) T c[2][scan::kChunk][scan::kN];
  alignas(16) float dls[2][scan::kChunk][scan::kN];
  alignas(16) float dys[2][scan::kChunk][scan::kN];
};

// kSeq: the segment's first document start (token), or INT_MAX where none lies in it. Why (session 18): the
// carry entering token t - 1 is (carry_t + dys_t C_t) exp(delta_t A), and delta is +inf at a start, so the carry
// at the segment's start (L) is the reverse over the tokens before its first start alone, and P (= exp(A sum
// delta)) is 0 - whatever the tokens after it hold. The groups then split only the tiles up to that start's tile (the
// start's reset happens inside it): the same (L, P) up to rounding (the groups' fold points move), for ~the distance
// from the segment's start to its first document start instead of the whole segment. H100, documents of ~1,000
// tokens (bench/results/s18/ab_prepass/): pre-pass b1 L8192 0.193 -> 0.070 ms, b2 L8192 0.256 -> 0.044, b3 L4096
// 0.276 -> 0.155. And the only start the scan must see is that one (the tokens after it do not reach L or P), so the
// scan's restart test needs no document ids. Every thread of the block calls it (block barriers).
template <int kThreadsPerBlock>
__device__ __forceinline__ int first_start(const MixerScanParams& p, int b, int seg_first, int seg_last) {
  using scan::kChunk;
  constexpr int kPer = 8;  // tokens per thread and round: 2,048 per round at 256 threads (a b1 L8192 segment)
  __shared__ int first;
  const int* sq = p.seq_idx + (int64_t)b * p.seqlen;
  const int lo = seg_first * kChunk, hi = min(p.seqlen, (seg_last + 1) * kChunk);  // lo >= 32: segments s >= 1
  if (threadIdx.x == 0) first = hi;
  __syncthreads();
  for (int base = lo; base < hi; base += kPer * kThreadsPerBlock) {
    const int t0 = base + kPer * threadIdx.x;
    int ids[kPer + 1];  // tokens t0 - 1 .. t0 + kPer - 1, loaded together (one round trip per round)
#pragma unroll
    for (int k = 0; k <= kPer; ++k) ids[k] = t0 - 1 + k < hi ? sq[t0 - 1 + k] : 0;
    int mine = hi;
#pragma unroll
    for (int k = kPer; k >= 1; --k)
      if (t0 - 1 + k < hi && ids[k] != ids[k - 1]) mine = t0 - 1 + k;
    mine = static_cast<int>(__reduce_min_sync(0xffffffffu, static_cast<unsigned>(mine)));
    if (threadIdx.x % 32 == 0 && mine < hi) atomicMin(&first, mine);
    if (__syncthreads_or(mine < hi)) break;  // a barrier with a block-uniform answer: every thread leaves together
  }
  const int f = first;  // (final: no thread writes it after the last barrier)
  return f < hi ? f : 0x7fffffff;
}

// kSeq (packed documents, session 13): delta is +inf at a document start (the decay restarts): the carry into the
// token before is 0 and P = exp(A sum delta) = 0 across it, so the folds need nothing more. Session 18: the groups
// split only the tiles up to the segment's first document start, the only start the scan tests (first_start).
template <typename T, bool kSeq = false>
__global__ void __launch_bounds__(kThr, 4) mixer_scan_bwd7_carry_kernel(MixerScanParams p) {
  using scan::kChunk;
  using scan::kN;
  constexpr int kVec = 16 / sizeof(T);  // 8
  __shared__ GroupSmem<T> gs[kGroups];
  const int gi = threadIdx.x / kGT, tid = threadIdx.x % kGT, S = p.bwd_segments, nseg = S - 1;
  const int head = blockIdx.x, b = blockIdx.y / nseg, seg = blockIdx.y % nseg + 1, c0 = head * kN;
  const int D = p.d_inner, L = p.seqlen, R = p.dt_rank;
  const int seg_first = seg * p.seg_tiles, seg_last = min(p.n_chunks, seg_first + p.seg_tiles) - 1;
  // kSeq: the carry at the segment's start depends only on its tokens up to its first document start (the decay
  // there is 0): the groups split the tiles up to that start's tile (session 18; see first_start).
  int last = seg_last, doc_start = 0x7fffffff;
  if constexpr (kSeq) {
    doc_start = first_start<kThr>(p, b, seg_first, seg_last);
    if (doc_start != 0x7fffffff) last = doc_start / kChunk;
  }
  int tile_first, tile_last;
  prepass::group_tiles(seg_first, last, gi, tile_first, tile_last);
  GroupSmem<T>& sm = gs[gi];
  const int64_t rowZ = p.zxbc_row_stride;
  const T* zx = static_cast<const T*>(p.zxbc) + (int64_t)b * p.zxbc_batch_stride;
  const T* dtb = static_cast<const T*>(p.dt_low) + (int64_t)b * p.dt_batch_stride;
  const T* dyb = static_cast<const T*>(p.dy) + (int64_t)b * L * D;
  // C copies: thread = (row tid / 2, 8-element half tid % 2) of the 32 x 16 slice
  const int crow = tid / 2, chalf = tid % 2;
  auto group_sync = [&] { prepass::group_sync(gi); };  // named barrier 1 + gi of the group's 64 threads
  // prep items (session 11: dt_proj on tensor cores, as the main kernel's prep): warp wi = tid / 32 of the group
  // takes tokens 16 wi .. + 15 (the m16 tile), lane (g, q) tokens 16 wi + g, + 8 and channels 2q, 2q + 1 (n-tile
  // 0) and 8 + 2q, 9 + 2q (n-tile 1) of m16n8k16 (bf16 / fp16, fp32 accumulate); B fragments = W_dt rounded to the
  // activation dtype (lane: column g of each n-tile, k = 2q, 2q + 1 and + 8).
  using M = scan4::MmaOp<T>;
  const int lane = tid % 32, wi = tid / 32, pg = lane / 4, pq = lane % 4;
  unsigned wb[2][2];
  float b2[2][2];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int k = hf * 8 + 2 * pq;
      const int64_t row = (int64_t)(c0 + 8 * nt + pg) * R;
      wb[nt][hf] = M::pack(k < R ? p.dt_w[row + k] : 0.f, k + 1 < R ? p.dt_w[row + k + 1] : 0.f);
      b2[nt][hf] = 2.f * p.dt_b[c0 + 8 * nt + 2 * pq + hf];  // (here hf = the channel of the lane's pair)
    }
  }
  // scan: channel sc = tid / 4, states 4 sq .. 4 sq + 3
  const int sc = tid / 4, sq = tid % 4;
  float A2[4], carry[4] = {0.f, 0.f, 0.f, 0.f}, sdelta = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) A2[i] = -__expf(p.A_log[(c0 + sc) * kN + 4 * sq + i]) * kLog2e;

  // Pipelined schedule: ONE group barrier per tile instead of three, the prep of the next tile (tile - 1: the walk
  // is in reverse) issued between this tile's scan tokens, whose ex2 / FFMA stream hides the prep's latency chain
  // (global loads -> mma -> softplus -> stores; ncu: the prep between barriers was latency-bound), as in the
  // forward v5's pipelined schedule (session 11). Same values in the same order: only the schedule differs.
  // Buffers by tile parity: the group's i-th tile (tile_last - i) has its C and items in c / dls / dys[i & 1].
  //   prologue: the first tile's C copy, operands and items into buffer 0;
  //   iteration i: wait for this thread's C copies; S; the scan of buffer par = i & 1 with, between its tokens, the
  //   next tile's C copy into c[par ^ 1] (cp.async: a register copy was sunk by ptxas next to its store, a
  //   full-latency stall), the global loads of its prep operands (straight into the prep's lane mapping: z / dy /
  //   dt_low never pass through shared memory), its dt_proj and its items into dls / dys[par ^ 1].
  // S of iteration i orders (RAW) the writes of buffer par (iteration i - 1's copy and prep, or the prologue; the
  // wait before S completes the thread's own copy) before this scan's reads of it, and (WAR) iteration i - 1's
  // scan reads of buffer par ^ 1 before this iteration's writes into it; nothing else is shared within the group.
  // The last tile (and an empty range's prologue) copies zeros and preps zero operands (loads off) into a buffer
  // nobody reads: the scan stays branch-free.
  // The next tile's operands in the mma's mapping (lane (pg, pq) of warp wi: rows 16 wi + pg + 8 hr, channels /
  // ranks 8 nt + 2 pq, + 1): zn / yn[2 hr + nt] = z / dy pairs, an = the A fragment (a[hr + 2 kh]: ranks 8 kh +
  // 2 pq); ranks >= R and rows >= L are zero, as the raw copies' zero fill made them.
  unsigned an[4], zn[4], yn[4];
  float dd[2][4];
  bool keep[2] = {true, true};  // kSeq: row hr's token is not the segment's first document start
  auto load_next = [&](int t0, bool have, int np) {
    const int pos = t0 + crow;
    const bool okc = have && pos < L;
    const T* src = zx + (int64_t)pos * rowZ + D + 2 * p.d_xb + c0 + chalf * kVec;
    scan4::cp_async16(&sm.c[np][crow][chalf * kVec], okc ? src : zx, okc);  // (row crow, half chalf; zero-filled)
    scan4::cp_async_commit();
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int pr = t0 + 16 * wi + pg + 8 * hr;
      const bool ok = have && pr < L;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int ch = 8 * nt + 2 * pq;
        zn[2 * hr + nt] = ok ? *reinterpret_cast<const unsigned*>(zx + (int64_t)pr * rowZ + c0 + ch) : 0u;
        yn[2 * hr + nt] = ok ? *reinterpret_cast<const unsigned*>(dyb + (int64_t)pr * D + c0 + ch) : 0u;
        const T* dtr = dtb + (int64_t)pr * p.dt_row_stride + ch;
        an[hr + 2 * nt] = ok && ch < R ? *reinterpret_cast<const unsigned*>(dtr) : 0u;
      }
      if constexpr (kSeq) keep[hr] = pr != doc_start;
    }
  };
  auto prep_mma = [&] {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) dd[nt][i] = 0.f;
      M::run(dd[nt], an, wb[nt]);
    }
  };
  auto prep_item = [&](int hr, int nt, int t0, int np) {  // token row 16 wi + pg + 8 hr, channels 8 nt + 2 pq, + 1
    const int row = 16 * wi + pg + 8 * hr, ch = 8 * nt + 2 * pq;
    const bool live = t0 + row < L;
    const float2 zz = scan4::unpack2<T>(zn[2 * hr + nt]), dy = scan4::unpack2<T>(yn[2 * hr + nt]);
    // (computed unconditionally, then selected: a branch would split the unrolled scan's basic block)
    const float s0 = scan4::softplus_select(dd[nt][2 * hr] + b2[nt][0]);
    const float s1 = scan4::softplus_select(dd[nt][2 * hr + 1] + b2[nt][1]);
    const float inf = __int_as_float(0x7f800000);
    *reinterpret_cast<float2*>(&sm.dls[np][row][ch]) =
        make_float2(live ? (keep[hr] ? s0 : inf) : 0.f, live ? (keep[hr] ? s1 : inf) : 0.f);
    *reinterpret_cast<float2*>(&sm.dys[np][row][ch]) =
        make_float2(dy.x * zz.x * sigmoid_fast(zz.x), dy.y * zz.y * sigmoid_fast(zz.y));
  };
  {
    const int t0 = tile_last * kChunk;
    load_next(t0, tile_first <= tile_last, 0);
    prep_mma();
#pragma unroll
    for (int it = 0; it < 4; ++it) prep_item(it / 2, it % 2, t0, 0);
  }
  // token rows of the prep pieces: copies / loads at the first token, then 12 tokens of scan before their use
  constexpr int kRowMma = 19, kRowItem = 17;  // items at kRowItem, - 2, - 4, - 6
  int par = 0;
  for (int tile = tile_last; tile >= tile_first; --tile, par ^= 1) {
    const int tn = (tile - 1) * kChunk, np = par ^ 1;
    scan4::cp_async_wait_all();  // (this thread's C copies; S makes them the group's)
    group_sync();                 // S
    const float* dlp = &sm.dls[par][0][sc];
    const float* dyp = &sm.dys[par][0][sc];
    const T* cp = &sm.c[par][0][4 * sq];
#pragma unroll
    for (int row = kChunk - 1; row >= 0; --row) {
      if (row == kChunk - 1) load_next(tn, tile > tile_first, np);
      if (row == kRowMma) prep_mma();
      if (row <= kRowItem && row > kRowItem - 8 && (kRowItem - row) % 2 == 0) {
        const int it = (kRowItem - row) / 2;
        prep_item(it / 2, it % 2, tn, np);
      }
      const float dl = dlp[row * kN], y = dyp[row * kN];
      const uint2 cw = *reinterpret_cast<const uint2*>(cp + row * kN);
      const float2 c01 = scan4::unpack2<T>(cw.x), c23 = scan4::unpack2<T>(cw.y);
      const float cv[4] = {c01.x, c01.y, c23.x, c23.y};
#pragma unroll
      for (int i = 0; i < 4; ++i) carry[i] = fmaf(y, cv[i], carry[i]) * ex2(dl * A2[i]);
      sdelta += dl;
    }
  }
  scan4::cp_async_wait_all();  // (the last zero-fill copy: none in flight past the loop)
  // Fold the groups (group 0 holds the earliest tiles): L = L_0 + P_0 (L_1 + P_1 (...)), P = exp(A sum delta).
  float* lp = p.seg_carry + (((int64_t)b * S + seg) * 2) * D * kN + (int64_t)(c0 + sc) * kN + 4 * sq;
  prepass::fold_groups<false>(gi, tid, carry, sdelta, A2, lp, (int64_t)D * kN);
}

}  // namespace scan7c

template <typename T>
void launch_mixer_scan_bwd7(const MixerScanParams& p, void* stream) {
  scan7b::launch<T>(p, stream);
}

#ifdef APRIEL_SCAN_BWD7_SPAN_TU  // (defined only in mixer_scan_bwd7s_*.cu: the other TUs link to their instances)
template <typename T>
void launch_mixer_scan_bwd7_span(const MixerScanParams& p, void* stream) {
  scan7b::launch_span<T>(p, stream);
}
#endif
#ifdef APRIEL_SCAN_BWD7_MULTI_TU  // (defined only in mixer_scan_bwd7m_*.cu)
template <typename T>
void launch_mixer_scan_bwd7_multi(const MixerScanParams& p, void* stream) {
  scan7b::launch_multi<T>(p, stream);
}
#endif

template <typename T>
void launch_mixer_scan_bwd7_carry(const MixerScanParams& p, void* stream) {
  dim3 grid(p.d_inner / scan::kN, p.batch * (p.bwd_segments - 1));
  const auto st = static_cast<cudaStream_t>(stream);
  if (p.seq_idx != nullptr) scan7c::mixer_scan_bwd7_carry_kernel<T, true><<<grid, scan7c::kThr, 0, st>>>(p);
  else scan7c::mixer_scan_bwd7_carry_kernel<T, false><<<grid, scan7c::kThr, 0, st>>>(p);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace apriel
