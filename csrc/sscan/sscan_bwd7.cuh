// Backward of the generic (mamba-compatible) selective scan on the mixer scan's v7 backward core (session 26): one
// WARP per 16 channels (a "head") in the mma accumulator layout, the state-dimension products on tensor cores, the
// recompute and the reverse of each 8-token sub-chunk by scan7b::recompute_sub / reverse_sub (mixer_scan_bwd7_core.cuh;
// the design and its measurements: mixer_scan_bwd7.cuh and docs/notes/scan.md "Session 6"). 16-bit activations.
//
// Why: the backward v2 (sscan_bwd2.cuh, the mixer's v4 design: K = 8 lanes per channel, 255 registers with spills)
// took 8.9 of the 10.0 ms of fwd+bwd at b8 L4096 D4096, where the mixer's v7 backward does more work per token (conv,
// dt_proj) in 5.5 ms; and its dB / dC partials were one row per 16 channels (1.07 GB at that shape).
//
// Block = 4 warps = 64 consecutive channels of one sequence inside one B group and one C group (the forward v7's
// shapes), tiles of 32 tokens in reverse order, 2 blocks per SM:
//   S1 wait for the tile's copies + barrier; issue the copies of the tile before (the forward v7's 14 slots - u,
//   delta, z of each warp's 16 channels, B, C - and dy of each warp's channels, in one orientation, by its
//   stage_fast); the tile's B operand table (and, token-fast, its B / C rows token-major);               barrier S2
//   per warp: pass A (sub-chunks 0..2: prep (delta, du) + recompute from the checkpoint -> the states at their ends);
//             pass B (sub-chunks 3..0: prep, recompute + readout, reverse, epilogue: du, d delta, dz stored);  S3
//   the block's 4 warps' dB / dC per token summed (fixed order) into one partial row per block: (b, L, d_inner / 64,
//   1, N) fp32, which the host sums per group.
// The prep computes the forward v7's values (delta, tf32(delta u), silu(z)); du, d delta and dz as the backward v2.
// Precision as the mixer's v7 backward: du and dy silu(z) enter the mmas as tf32, G / q / h are truncated to tf32 in
// the state-sum mmas; the recurrences and every accumulation stay fp32.
// Not handled (the host runs v2): fp32 activations, packed documents (seq_idx), layouts without the forward v7's fast
// staging, other shapes.
#pragma once
#include "../scan/mixer_scan_bwd7_core.cuh"  // scan7b:: recompute_sub, reverse_sub, RevLane, kSub
#include "sscan_fwd7.cuh"                     // sscan7:: slots, slot_source, stage_fast, b_operand
#include "sscan_prepass.cuh"                  // sscanpp:: the split pre-passes' groups, copies and fold

namespace apriel {
namespace sscan7b {

using scan7b::kNSub;
using scan7b::kSub;
using sscan::kT;
using sscan7::kHeads;
using sscan7::kN;
using sscan7::kSlots;
using sscan7::kThreads;
using sscan7::delta_of;
using sscan7::gate_sigmoid;
static_assert(kT == scan::kChunk, "the forward's checkpoints are per 32-token tile");

constexpr int kSlotDy = kSlots;                // dy of each warp's 16 channels after the forward's 14 slots
constexpr int kBwdSlots = kSlots + kHeads;

template <typename T>
struct Smem {
  alignas(16) T raw[2][kBwdSlots][16 * kT];  // by tile parity: the forward v7's kFast slots, then dy (same orientation)
  alignas(16) T Bt[kT][kN];               // token-fast staging: the tile's B / C rows token-major
  alignas(16) T Ct[kT][kN];
  alignas(16) float4 bop[kT / 2][9];      // B as the k4 B operand per token pair; entry 8 = zeros
  alignas(16) float red[kHeads][kT][32];  // per warp and token: dB (states 0..15) then dC (16..31) of its channels
  struct Warp {                           // one warp's sub-chunk items; [t][c] = (sub-chunk token, channel)
    alignas(16) float2 du[kSub][kN];      // (tf32(delta u), delta); 0 past the sequence end
    alignas(16) float dys[kSub][kN];      // tf32(dy silu(z))
    alignas(16) float u[kSub][kN];
    alignas(16) float dsp[kSub][kN];      // d delta / d(delta input): softplus' (1 without softplus)
    alignas(16) float dzf[kSub][kN];      // dy silu'(z)
    alignas(16) float yc[kSub][kN];       // readout C . h
    alignas(16) float4 ppu[kSub][8];      // (pp, pp, pu, pu) of channels 2g, 2g + 1
    alignas(16) float4 cop4[kSub / 2][9]; // C as the k4 B operand per token pair; entry 8 = zeros
    alignas(16) float4 bst[kNSub - 1][2][32];  // states after tokens 7, 15, 23 of the tile, per lane (pass A)
  };
  Warp wp[kHeads];
  const T* src[kBwdSlots];                // each slot's first element of this block (sequence, channels)
  int64_t src_stride[kBwdSlots];          // and the stride of its copied rows
};
static_assert(sizeof(Smem<__nv_bfloat16>) + 1024 <= 233472 / 2, "2 blocks per SM must fit");

// What reverse_sub reads and writes of a warp, for sub-chunk j: its items and its rows of the tile's dB / dC sums.
struct WarpView {
  float2 (*du)[kN];
  float (*dys)[kN];
  float4 (*cop4)[9];
  float4 (*ppu)[8];
  float (*red)[32];
};

// kBT: the activations staged token-fast (mamba's channel-major layout), else token-major (the forward v7's kFast
// orientations). kFastPrep: softplus with the MUFU forms (the default), as the forward v7's.
template <typename T, bool kBT, bool kFastPrep>
__global__ void __launch_bounds__(kThreads, 2) sscan_bwd7_kernel(SScanParams p) {
  static_assert(sizeof(T) == 2, "16-bit activations");
  using S = sscan7::Slot<T, true>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem<T>& sm = *reinterpret_cast<Smem<T>*>(smem_raw);
  const int tid = threadIdx.x, lane = tid % 32, w = tid / 32, g = lane / 4, q = lane % 4;
  const int c0 = blockIdx.x * (kHeads * 16), hc0 = c0 + 16 * w;  // block / warp first channel
  const int segs = p.bwd_segments, b = blockIdx.y / segs, seg = blockIdx.y % segs;  // (the sequence split)
  const int D = p.dim, L = p.seqlen, n_tiles = p.n_chunks;
  const int tile_first = seg * p.seg_tiles, tile_last = min(n_tiles, tile_first + p.seg_tiles) - 1;
  const bool has_z = p.z != nullptr;
  typename Smem<T>::Warp& wp = sm.wp[w];

  if (tid < kSlots) {
    const sscan7::SlotSrc src = sscan7::slot_source<T>(p, b, c0, tid);
    sm.src[tid] = static_cast<const T*>(src.ptr);
    sm.src_stride[tid] = kBT ? src.cs : src.ls;
  } else if (tid < kBwdSlots) {  // dy (the host made its orientation the activations')
    sm.src[tid] = static_cast<const T*>(p.dy) + (int64_t)b * p.dy_sb + (int64_t)(c0 + 16 * (tid - kSlotDy)) * p.dy_sc;
    sm.src_stride[tid] = kBT ? p.dy_sc : p.dy_sl;
  }
  if (tid < kT / 2) sm.bop[tid][8] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (lane < kSub / 2) wp.cop4[lane][8] = make_float4(0.f, 0.f, 0.f, 0.f);
  __syncthreads();  // the sources
  // The tile at t0 into parity par: the forward's 14 slots and the 4 dy slots.
  auto stage = [&](int par, int t0) {
    sscan7::stage_fast<T, kBT, kBwdSlots>(sm.raw[par], sm.src, sm.src_stride, t0, L, tid, has_z);
    sscan2::cp_async_commit();
  };
  stage(tile_last & 1, tile_last * kT);

  // Scan constants / state: element [nt][i] = channel 2g + (i >> 1) of the warp's 16, state 8 nt + 2q + (i & 1).
  float An[2][4], A2[2][4], carry[2][4], dAacc[2][4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int cs = hc0 + 2 * g + (i >> 1), n = nt * 8 + 2 * q + (i & 1);
      An[nt][i] = p.A[(int64_t)cs * kN + n];
      A2[nt][i] = An[nt][i] * sscan::kLog2e;
      carry[nt][i] = p.dfinal != nullptr ? p.dfinal[((int64_t)b * D + cs) * kN + n] : 0.f;
      dAacc[nt][i] = 0.f;
    }
  // Sequence split: the carry entering this segment's last token - the final state's gradient carried through the
  // later segments by the pre-pass's (L, P): carry = L_s2 + P_s2 carry, s2 = S - 1 .. seg + 1 (fixed order).
  for (int s2 = segs - 1; s2 > seg; --s2) {
    const float* lp = p.seg_carry + (((int64_t)b * segs + s2) * 2) * D * kN;
    float lv[2][4], pv[2][4];
    scan7b::load_state(lp, hc0, g, q, lv);
    scan7b::load_state(lp + (int64_t)D * kN, hc0, g, q, pv);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) carry[nt][i] = fmaf(pv[nt][i], carry[nt][i], lv[nt][i]);
  }
  const int bsel = q == 0 ? g : 8;  // lanes q > 0 read the zero entry: rows k >= 1 of a k4 B operand
  const scan7b::RevLane rl = scan7b::rev_lane(lane);
  // Prep mapping. Token-fast: lane = (channel pair pp = lane % 8: channels 2 pp, + 1; token pair tp = lane / 8:
  // sub-chunk tokens 2 tp, + 1), one 32-bit word (2 tokens of a channel) per load. Token-major: lane = (token g,
  // channels 4q .. 4q + 3), one 8-byte load per tensor.
  constexpr int kPC = kBT ? 2 : 4;
  const int pp = lane % 8, tp = lane / 8;
  float bias[kPC];
#pragma unroll
  for (int e = 0; e < kPC; ++e) {
    const int pc = hc0 + (kBT ? 2 * pp + e : 4 * q + e);
    bias[e] = p.delta_bias != nullptr ? p.delta_bias[pc] : 0.f;
  }
  // Epilogue mapping: channel ec, tokens eh, eh + 2, eh + 4, eh + 6 of the sub-chunk (the half warps on rows 64 bytes
  // apart, other banks: the mixer kernel's, session 28); per-channel sums over the sequence.
  const int ec = lane & 15, eh = lane >> 4;
  const float Dc = p.Dskip != nullptr ? p.Dskip[hc0 + ec] : 0.f;
  float accD = 0.f, accDB = 0.f;

  // One item (channel, token): the forward's delta / du / gate and the derivatives the epilogue needs.
  struct Item {
    float du, dl, dys, u, dsp, dzf;
  };
  auto item = [&](float u, float v, float zz, float dyv, bool live) {
    const float delta = delta_of<kFastPrep>(p, v);
    float dsp = 1.f, sz = 1.f, gz = 1.f;
    if constexpr (kFastPrep) dsp = v > 20.f ? 1.f : sscan::sigmoid_fast(v);
    else if (p.softplus && v <= 20.f) dsp = p.fast_prep ? sscan::sigmoid_fast(v) : sscan::sigmoidf_(v);
    if (has_z) {
      sz = gate_sigmoid<kFastPrep>(p, zz);
      gz = zz * sz;
    }
    Item it;
    it.du = live ? scan7::tf32_rna(delta * u) : 0.f;
    it.dl = live ? delta : 0.f;
    it.dys = scan7::tf32_rna(dyv * gz);  // (0 past the end: dy rows zero-filled)
    it.u = u;
    it.dsp = dsp;
    it.dzf = has_z ? dyv * sz * (1.f + zz * (1.f - sz)) : 0.f;
    return it;
  };

  for (int tile = tile_last; tile >= tile_first; --tile) {
    const int t0 = tile * kT, par = tile & 1, Tv = min(kT, L - t0);
    sscan2::cp_async_wait_all();
    __syncthreads();  // S1: the tile's copies are visible; every reader of the tile after it is done
    if (tile > tile_first) stage(par ^ 1, t0 - kT);
    const T* ru = sm.raw[par][sscan7::kSlotU + w];
    const T* rd = sm.raw[par][sscan7::kSlotDelta + w];
    const T* rz = sm.raw[par][sscan7::kSlotZ + w];
    const T* rB = sm.raw[par][sscan7::kSlotB];
    const T* rC = sm.raw[par][sscan7::kSlotC];
    const T* rdy = sm.raw[par][kSlotDy + w];
    sm.bop[tid / 8][tid % 8] = sscan7::b_operand<T, true, kBT>(rB, tid);
    if constexpr (kBT) {  // B / C rows token-major: thread = (state tid % 16, tokens 4 (tid / 16) .. + 3)
      const int n = tid % 16, tq = tid / 16;
      const uint2 wb = *reinterpret_cast<const uint2*>(rB + S::tf(n, 4 * tq));
      const uint2 wc = *reinterpret_cast<const uint2*>(rC + S::tf(n, 4 * tq));
      const unsigned bw[2] = {wb.x, wb.y}, cw[2] = {wc.x, wc.y};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const unsigned short bk = static_cast<unsigned short>(bw[k / 2] >> (16 * (k & 1)));
        const unsigned short ck = static_cast<unsigned short>(cw[k / 2] >> (16 * (k & 1)));
        reinterpret_cast<unsigned short*>(&sm.Bt[4 * tq + k][0])[n] = bk;
        reinterpret_cast<unsigned short*>(&sm.Ct[4 * tq + k][0])[n] = ck;
      }
    }
    __syncthreads();  // S2: bop, Bt / Ct
    const T (*Brow)[kN] = kBT ? sm.Bt : reinterpret_cast<const T (*)[kN]>(rB);
    const T (*Crow)[kN] = kBT ? sm.Ct : reinterpret_cast<const T (*)[kN]>(rC);

    // Prep of sub-chunk j (tile tokens 8j .. 8j + 7); kFull: also the reverse / epilogue items and the C operand.
    auto prep = [&](int j, auto full_tag) {
      constexpr bool kFull = decltype(full_tag)::value;
      if constexpr (kBT) {
        const int tl0 = 2 * tp, t = kSub * j + tl0;  // tokens t, t + 1 of channels 2 pp, 2 pp + 1
        unsigned wu[2], wd[2], wz[2] = {0u, 0u}, wy[2] = {0u, 0u};
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          wu[e] = sscan7::pair_word<T, true>(ru, 2 * pp + e, t);
          wd[e] = sscan7::pair_word<T, true>(rd, 2 * pp + e, t);
          if (kFull && has_z) wz[e] = sscan7::pair_word<T, true>(rz, 2 * pp + e, t);
          if (kFull) wy[e] = sscan7::pair_word<T, true>(rdy, 2 * pp + e, t);
        }
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          Item it[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float u = sscan2::half_of<T>(wu[e], k), v = sscan2::half_of<T>(wd[e], k) + bias[e];
            const float zz = sscan2::half_of<T>(wz[e], k), dyv = sscan2::half_of<T>(wy[e], k);
            it[e] = item(u, v, zz, dyv, t + k < Tv);
          }
          const int tl = tl0 + k;
          *reinterpret_cast<float4*>(&wp.du[tl][2 * pp]) = make_float4(it[0].du, it[0].dl, it[1].du, it[1].dl);
          if constexpr (kFull) {
            *reinterpret_cast<float2*>(&wp.dys[tl][2 * pp]) = make_float2(it[0].dys, it[1].dys);
            *reinterpret_cast<float2*>(&wp.u[tl][2 * pp]) = make_float2(it[0].u, it[1].u);
            *reinterpret_cast<float2*>(&wp.dsp[tl][2 * pp]) = make_float2(it[0].dsp, it[1].dsp);
            *reinterpret_cast<float2*>(&wp.dzf[tl][2 * pp]) = make_float2(it[0].dzf, it[1].dzf);
          }
        }
      } else {
        const int tl = g, t = kSub * j + tl;  // token t, channels 4q .. 4q + 3
        const uint2 wu = *reinterpret_cast<const uint2*>(ru + t * 16 + 4 * q);
        const uint2 wd = *reinterpret_cast<const uint2*>(rd + t * 16 + 4 * q);
        const uint2 wz = kFull && has_z ? *reinterpret_cast<const uint2*>(rz + t * 16 + 4 * q) : make_uint2(0u, 0u);
        const uint2 wy = kFull ? *reinterpret_cast<const uint2*>(rdy + t * 16 + 4 * q) : make_uint2(0u, 0u);
        Item it[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          auto val = [&](uint2 w2) { return sscan2::half_of<T>(e < 2 ? w2.x : w2.y, e & 1); };
          it[e] = item(val(wu), val(wd) + bias[e], val(wz), val(wy), t < Tv);
        }
        *reinterpret_cast<float4*>(&wp.du[tl][4 * q]) = make_float4(it[0].du, it[0].dl, it[1].du, it[1].dl);
        *reinterpret_cast<float4*>(&wp.du[tl][4 * q + 2]) = make_float4(it[2].du, it[2].dl, it[3].du, it[3].dl);
        if constexpr (kFull) {
          *reinterpret_cast<float4*>(&wp.dys[tl][4 * q]) = make_float4(it[0].dys, it[1].dys, it[2].dys, it[3].dys);
          *reinterpret_cast<float4*>(&wp.u[tl][4 * q]) = make_float4(it[0].u, it[1].u, it[2].u, it[3].u);
          *reinterpret_cast<float4*>(&wp.dsp[tl][4 * q]) = make_float4(it[0].dsp, it[1].dsp, it[2].dsp, it[3].dsp);
          *reinterpret_cast<float4*>(&wp.dzf[tl][4 * q]) = make_float4(it[0].dzf, it[1].dzf, it[2].dzf, it[3].dzf);
        }
      }
      if constexpr (kFull) {  // C operand: 4 token pairs x 8 entries
        const int pr = lane >> 3, gg = lane & 7, tc = kSub * j + 2 * pr;
        wp.cop4[pr][gg] = make_float4(sscan::to_f(Crow[tc][gg]), sscan::to_f(Crow[tc][gg + 8]),
                                      sscan::to_f(Crow[tc + 1][gg]), sscan::to_f(Crow[tc + 1][gg + 8]));
      }
    };

    const float* ck = p.ckpt_in + ((int64_t)b * n_tiles + tile) * D * kN;
    // Pass A: the states after tokens 7, 15, 23 (only the sub-chunks before the last one are needed).
    {
      float h[2][4], hs_unused[kSub][2][4];
      scan7b::load_state(ck, hc0, g, q, h);
#pragma unroll 1
      for (int j = 0; j < kNSub - 1; ++j) {
        prep(j, std::false_type{});
        __syncwarp();
        scan7b::recompute_sub<T, false>(j, wp.du, sm.bop, bsel, Crow, wp.yc, A2, h, hs_unused, g, q);
        scan7b::store_sub_state(wp.bst, j, lane, h);
        __syncwarp();
      }
    }
    // Pass B: sub-chunks in reverse.
    T* const du_out = static_cast<T*>(p.du);
    float* const du_out32 = static_cast<float*>(p.du);
    T* const ddelta_out = static_cast<T*>(p.ddelta);
    T* const dz_out = static_cast<T*>(p.dz);
#pragma unroll 1
    for (int j = kNSub - 1; j >= 0; --j) {
      prep(j, std::true_type{});
      float hstart[2][4];
      scan7b::sub_start_state(wp.bst, j, lane, ck, hc0, g, q, hstart);
      __syncwarp();
      float hs[kSub][2][4];
      scan7b::recompute_kept<T>(j, wp.du, sm.bop, bsel, Crow, wp.yc, A2, hstart, hs, g, q);
      WarpView view{wp.du, wp.dys, wp.cop4, wp.ppu, &sm.red[w][kSub * j]};
      scan7b::reverse_sub<T>(j, view, Brow, rl, A2, An, hs, hstart, carry, dAacc, g, q);
      __syncwarp();
      // Epilogue per (channel ec, token): du, d delta, dz stored (b, L, D); the per-channel sums.
      int64_t o = ((int64_t)b * L + t0 + kSub * j + eh) * D + hc0 + ec;
#pragma unroll
      for (int i = 0; i < 4; ++i, o += 2 * D) {
        const int tl = eh + 2 * i, t = kSub * j + tl;
        const float4 pq4 = wp.ppu[tl][ec >> 1];
        const float pp_ = (ec & 1) ? pq4.y : pq4.x, pu = (ec & 1) ? pq4.w : pq4.z;
        const float delta = wp.du[tl][ec].y, u = wp.u[tl][ec], dys = wp.dys[tl][ec];
        const float ddl = fmaf(u, pu, pp_) * wp.dsp[tl][ec];
        const float dut = fmaf(delta, pu, dys * Dc);
        if (t < Tv) {
          accD = fmaf(dys, u, accD);
          accDB += ddl;
          if (p.du_f32) du_out32[o] = dut;
          else du_out[o] = from_f<T>(dut);
          ddelta_out[o] = from_f<T>(ddl);
          if (has_z) dz_out[o] = from_f<T>(fmaf(Dc, u, wp.yc[tl][ec]) * wp.dzf[tl][ec]);
        }
      }
      __syncwarp();  // the sub-chunk's items are read before the next prep rewrites them
    }
    __syncthreads();  // S3: every warp's dB / dC rows of the tile
    {  // the block's sums: thread = (token tid / 4, 8 values 8 (tid % 4) ..: dB states 0..15 then dC), warps in order
      const int t = tid / 4, part = tid % 4;
      float4 s0 = *reinterpret_cast<const float4*>(&sm.red[0][t][8 * part]);
      float4 s1 = *reinterpret_cast<const float4*>(&sm.red[0][t][8 * part + 4]);
#pragma unroll
      for (int ww = 1; ww < kHeads; ++ww) {
        const float4 a0 = *reinterpret_cast<const float4*>(&sm.red[ww][t][8 * part]);
        const float4 a1 = *reinterpret_cast<const float4*>(&sm.red[ww][t][8 * part + 4]);
        s0.x += a0.x; s0.y += a0.y; s0.z += a0.z; s0.w += a0.w;
        s1.x += a1.x; s1.y += a1.y; s1.z += a1.z; s1.w += a1.w;
      }
      if (t < Tv) {
        float* dst = (part < 2 ? p.dB_part : p.dC_part) +
                     (((int64_t)b * L + t0 + t) * gridDim.x + blockIdx.x) * kN + 8 * (part & 1);
        *reinterpret_cast<float4*>(dst) = s0;
        *reinterpret_cast<float4*>(dst + 4) = s1;
      }
    }
  }

  // The segment's sums, one row per (b, segment): dA (sum of q delta), dD, d bias; segment 0: the initial state's
  // gradient (the carry past token 0).
  const int64_t row = (int64_t)b * segs + seg;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int r2 = 0; r2 < 2; ++r2) {
      const int64_t o = (hc0 + 2 * g + r2) * kN + nt * 8 + 2 * q;
      *reinterpret_cast<float2*>(p.dA_part + row * D * kN + o) = make_float2(dAacc[nt][2 * r2], dAacc[nt][2 * r2 + 1]);
      if (p.dinit != nullptr && seg == 0)
        *reinterpret_cast<float2*>(p.dinit + (int64_t)b * D * kN + o) =
            make_float2(carry[nt][2 * r2], carry[nt][2 * r2 + 1]);
    }
  accD += __shfl_xor_sync(0xffffffffu, accD, 16);
  accDB += __shfl_xor_sync(0xffffffffu, accDB, 16);
  if (lane < 16) {
    p.dD_part[row * D + hc0 + ec] = accD;
    p.ddb_part[row * D + hc0 + ec] = accDB;
  }
}

template <typename T, bool kBT, bool kFastPrep>
void launch(const SScanParams& p, void* stream) {
  constexpr int smem = sizeof(Smem<T>);
  auto kernel = sscan_bwd7_kernel<T, kBT, kFastPrep>;
  static const bool configured = scan7::allow_smem(reinterpret_cast<const void*>(kernel), smem);  // once
  (void)configured;
  const dim3 grid(p.dim / (kHeads * 16), p.batch * p.bwd_segments);
  kernel<<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace sscan7b

// The carry pre-pass of the sequence split (p.bwd_segments > 1), as the mixer's (mixer_scan_bwd7.cuh scan7c): for
// every segment s >= 1 of every sequence, L_s = the adjoint carry at the segment's start given a zero carry at its end
// (carry = (carry + dys_t C_t) exp(delta_t A) over its tokens in reverse) and P_s = exp(A sum_t delta_t); the main
// kernel's block of segment s folds the later segments' (L, P) into its starting carry. Its work is ~(S - 1) / S of a
// readout-free scan (one ex2 per element), plus the prep (delta, dy silu(z)) once per (channel, token).
// Layout (sscan_prepass.cuh): block = one head of one segment, 4 groups of 64 threads over quarters of its tiles. Per
// group and 32-token tile (reverse order):
//   wait for the thread's copies; group barrier A (the tile's raw slots are the group's; the scan before is done);
//   prep: raw delta / z / dy / C -> fp32 delta (0 past the end), tf32(dy silu(z)) (the main kernel's rounding), C;
//   group barrier B (the prep is the group's; raw is free); the next tile's copies (in flight during the scan); the
//   scan: thread = (channel tid / 4, states 4 (tid % 4) .. + 3), 32 tokens.
namespace sscan7c {

using sscan::kT;
using sscan7::delta_of;
using sscan7::gate_sigmoid;
using sscan7::kN;
using sscanpp::kGT;
using sscanpp::kGroups;
using sscanpp::kThr;
enum { kRDelta = 0, kRZ = 1, kRDy = 2, kRC = 3, kRSlots = 4 };

template <typename T>
struct GroupSmem {                        // 10 KB; 40 KB per block
  alignas(16) T raw[kRSlots][16 * kT];    // delta, z, dy (the head's 16 channels), C (16 states); kBT [row][token]
  alignas(16) float dl[kT][16];           // [token][channel]
  alignas(16) float dys[kT][16];
  alignas(16) float c[kT][16];            // [token][state]
};

// (Launch bounds: 4 blocks per SM, as its 46 KB of shared memory allow; without them one instantiation took 73
// registers, 3 blocks.)
template <typename T, bool kBT, bool kFastPrep>
__global__ void __launch_bounds__(kThr, 4) sscan_bwd7_carry_kernel(SScanParams p) {
  __shared__ GroupSmem<T> gs[kGroups];
  const int gi = threadIdx.x / kGT, tid = threadIdx.x % kGT, S = p.bwd_segments, nseg = S - 1;
  const int c0 = blockIdx.x * 16, b = blockIdx.y / nseg, seg = blockIdx.y % nseg + 1;  // (segments 1 .. S - 1)
  const int D = p.dim, L = p.seqlen;
  const int seg_first = seg * p.seg_tiles, seg_last = min(p.n_chunks, seg_first + p.seg_tiles) - 1;
  int tile_first, tile_last;
  sscanpp::group_tiles(seg_first, seg_last, gi, tile_first, tile_last);
  GroupSmem<T>& sm = gs[gi];
  const bool has_z = p.z != nullptr;
  // The slots' first elements (row 0, token 0) and row strides (kBT: channel / state rows, else token rows).
  const T* base[kRSlots];
  int64_t stride[kRSlots];
  base[kRDelta] = static_cast<const T*>(p.dl) + (int64_t)b * p.dl_sb + (int64_t)c0 * p.dl_sc;
  stride[kRDelta] = kBT ? p.dl_sc : p.dl_sl;
  base[kRZ] = has_z ? static_cast<const T*>(p.z) + (int64_t)b * p.z_sb + (int64_t)c0 * p.z_sc : base[kRDelta];
  stride[kRZ] = has_z ? (kBT ? p.z_sc : p.z_sl) : stride[kRDelta];
  base[kRDy] = static_cast<const T*>(p.dy) + (int64_t)b * p.dy_sb + (int64_t)c0 * p.dy_sc;
  stride[kRDy] = kBT ? p.dy_sc : p.dy_sl;
  base[kRC] = static_cast<const T*>(p.C) + (int64_t)b * p.C_sb + (int64_t)(c0 / p.c_cpg) * p.C_sg;
  stride[kRC] = kBT ? p.C_sn : p.C_sl;
  const unsigned skip = has_z ? 0u : 1u << kRZ;
  auto copy_tile = [&](int t0, bool have) {
    sscanpp::copy_tile<T, kBT, kRSlots>(sm.raw, base, stride, skip, tid, t0, L, have);
  };
  // prep mapping: row (channel / state) tid % 16, tokens 8 (tid / 16) .. + 7 (octet tid / 16 of the tile)
  const int qr = tid % 16, qo = tid / 16, qt0 = 8 * qo;
  const float bias = p.delta_bias != nullptr ? p.delta_bias[c0 + qr] : 0.f;
  // scan mapping: channel sc, states 4 sq .. + 3
  const int sc = tid / 4, sq = tid % 4;
  float A2[4], carry[4] = {0.f, 0.f, 0.f, 0.f}, sdelta = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) A2[i] = p.A[(int64_t)(c0 + sc) * kN + 4 * sq + i] * sscan::kLog2e;

  copy_tile(tile_last * kT, tile_first <= tile_last);
  for (int tile = tile_last; tile >= tile_first; --tile) {
    const int t0 = tile * kT;
    sscan2::cp_async_wait_all();
    sscanpp::group_sync(gi);  // A
    float rd[8], ry[8], rz[8], rc[8];
    sscanpp::raw_octet<T, kBT>(sm.raw[kRDelta], qr, qo, rd);
    sscanpp::raw_octet<T, kBT>(sm.raw[kRDy], qr, qo, ry);
    sscanpp::raw_octet<T, kBT>(sm.raw[kRC], qr, qo, rc);
    if (has_z) sscanpp::raw_octet<T, kBT>(sm.raw[kRZ], qr, qo, rz);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int t = qt0 + k;
      float gz = 1.f;
      if (has_z) gz = rz[k] * gate_sigmoid<kFastPrep>(p, rz[k]);
      sm.dl[t][qr] = t0 + t < L ? delta_of<kFastPrep>(p, rd[k] + bias) : 0.f;
      sm.dys[t][qr] = scan7::tf32_rna(ry[k] * gz);  // (0 past the end: dy zero-filled)
      sm.c[t][qr] = rc[k];
    }
    sscanpp::group_sync(gi);  // B
    copy_tile(t0 - kT, tile > tile_first);
#pragma unroll
    for (int t = kT - 1; t >= 0; --t) {
      const float dl = sm.dl[t][sc], y = sm.dys[t][sc];
      const float4 cv = *reinterpret_cast<const float4*>(&sm.c[t][4 * sq]);
      const float c4[4] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) carry[i] = fmaf(y, c4[i], carry[i]) * ex2(dl * A2[i]);
      sdelta += dl;
    }
  }
  sscan2::cp_async_wait_all();  // (the last, empty copy)
  // L = L_0 + P_0 (L_1 + P_1 (...)) (group 0 holds the earliest tiles), P = exp(A sum delta)
  float* out = p.seg_carry + (((int64_t)b * S + seg) * 2) * D * kN + (int64_t)(c0 + sc) * kN + 4 * sq;
  sscanpp::fold_groups<false>(gi, tid, carry, sdelta, A2, out, (int64_t)D * kN);
}

template <typename T, bool kBT, bool kFastPrep>
void launch(const SScanParams& p, void* stream) {
  const dim3 grid(p.dim / 16, p.batch * (p.bwd_segments - 1));
  sscan_bwd7_carry_kernel<T, kBT, kFastPrep><<<grid, kThr, 0, static_cast<cudaStream_t>(stream)>>>(p);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace sscan7c

// The host set p.bwd_v7 only where the forward v7's fast staging applies (sscan_fwd7_fast_layout != 0), with dy in
// the activations' orientation and 16-byte copies.
template <typename T>
void launch_sscan_bwd7(const SScanParams& p, void* stream) {
  const bool bt = sscan_fwd7_fast_layout(p) == 1;
  auto go = [&](auto fast_prep) {
    constexpr bool kFP = decltype(fast_prep)::value;
    if (p.bwd_segments > 1) {  // the carry pre-pass of the sequence split, then the segments
      if (bt) sscan7c::launch<T, true, kFP>(p, stream);
      else sscan7c::launch<T, false, kFP>(p, stream);
    }
    if (bt) sscan7b::launch<T, true, kFP>(p, stream);
    else sscan7b::launch<T, false, kFP>(p, stream);
  };
  if (p.softplus && p.fast_prep) go(std::true_type{});
  else go(std::false_type{});
}

}  // namespace apriel
