// Fused Apriel-H1 mixer scan, backward, v7: the forward v7's tensor-core layout applied to the adjoint (16-bit
// activations).
//
// Why a v7: the v4 backward (mixer_scan_bwd4.cuh: K = 8 lanes per channel, 2 states per thread) executes ~35
// instructions per (channel, state, token) element at 255 registers and 2 blocks per SM (33 % issue); it is ~7.3
// of the 9.7 ms of fwd+bwd at b8 L4096. v7 puts a head (16 channels x 16 states) on TWO warps in the mma
// accumulator layout of the forward v7, one n-tile of 8 states each: lane (g = lane / 4, q = lane % 4) of warp
// (head, nt) owns channels 2g, 2g + 1 (mma rows g, g + 8) x states 8 nt + 2q, 8 nt + 2q + 1 (4 elements), and
// the state-dimension products go to tensor cores:
//   recompute  h_t = a_t h_{t-1} + du_t (x) B_t      du (x) B: one tf32 mma.m16n8k4 (A = du in every column, B = B_t
//                                                     in row 0), as the forward v7
//              C_t . h_t (the readout, for dz)        one tf32 mma.m16n8k8 (h's registers as the A operand): a
//                                                     partial over the warp's 8 states, the pair's sum in the epilogue
//   reverse    G_t = carry + dys_t (x) C_t            one m16n8k4 with the carry as its accumulator input
//              carry' = G_t a_t; q = carry' h_{t-1}; dA_log += q delta (x A at the end)
//              pu = sum_n G_t B_t   (d(delta u))      one m16n8k8 (A = G, B = B_t replicated in the columns)
//              pp = sum_n q A       (d delta, decay)  two m16n8k8 whose B columns are the A rows of the even / odd
//                                                     channels (the lane's own An registers); the diagonal entries
//                                                     land in lane q = g / 2
//              dB_t = sum_c G du, dC_t = sum_c dys h   channel sums: a 3-level shuffle reduce-scatter over the 8
//                                                     lanes of a column
// Why two warps per head (session 6): one warp per head (8 elements per lane) measured 254 registers, 2 blocks of
// 4 warps per SM and 45 % issue (ncu: fixed-latency and short-scoreboard stalls with 2 warps per scheduler); with
// 4 elements per lane the same work fits twice the warps.
// Registers: the recomputed states of a 32-token tile do not fit, so the tile is processed in 8-token sub-chunks:
// pass A recomputes tokens 0..23 from the checkpoint and keeps the states at the sub-chunk boundaries (shared
// memory); pass B takes the sub-chunks in reverse, recomputes 8 tokens into registers (hs[8][4]) and runs their
// adjoint. ex2 per element: 0.75 (pass A) + 1 + 1.
// Per (channel, token) work (prep: conv + silu, dt_proj by mma, softplus, silu(z) and the derivatives; epilogue:
// dz, d(dt_pre), D skip, conv weight / bias sums, transposed conv) is split between the two warps of a head, which
// meet at named barriers (one per head).
// Outputs: the v4 backward's partial layouts (scan_api.cpp: mixer_scan_bwd_cuda); with heads_per_group == 4 the
// block holds the whole group and writes the x / B slices of dzxbc itself (p.bwd_fused_sums: no fp32 (b, L, D)
// partial buffers, no head-sum kernel). Precision: du and dys enter the mmas rounded to tf32 (round to nearest), G
// / q / h are truncated to tf32 inside the state-sum mmas; the recurrences (h, carry) and every accumulation stay
// fp32.
//
// Block = 4 consecutive heads of one x / B group (8 warps), one sequence, tiles in reverse order:
//   S1 wait cp.async + barrier; issue the copies of the tile before; A (block): x -> fp32 with the conv halo
//   (rows t0-3 .. t0-1, or the initial conv state), the B operand table;                      barrier S2
//   per head (2 warps): pass A (sub-chunks 0..2: prep (delta, du) + recompute -> boundary states);
//                       pass B (sub-chunks 3..0: prep, recompute + readout, reverse, epilogue, transposed conv,
//                       dC / dB stores or the group sums).
// Not handled (the dispatcher runs v4): seq_idx (packed documents), fp32 activations, dt_rank > 16, rows that are
// not 16-byte aligned (zxbc, dt_low, dy), heads_per_group % 4 != 0.
#pragma once
#include "../common/cuda_check.h"
#include "scan_common.cuh"
#include <type_traits>

#include "mixer_scan_fwd7.cuh"  // scan7:: stage, mma_k4, mma_k8, tf32_rna, Smem7::Raw

namespace apriel {
namespace scan7b {

using scan::from_f;
using scan::kChunk;
using scan::kLog2e;
using scan::kN;
using scan::to_f;
using scan7::kHeads;
using scan7::mma_k4;
using scan7::mma_k8;
using scan7::tf32_rna;

// d = A (16 x 4, every column a0 / a1) * B (row 0 = b0) + c: mma_k4 with an accumulator input.
__device__ __forceinline__ void mma_k4c(float (&d)[4], float a0, float a1, float b0, const float (&c)[4]) {
  asm("mma.sync.aligned.m16n8k4.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(__float_as_uint(a0)), "r"(__float_as_uint(a1)), "r"(__float_as_uint(b0)), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
}

constexpr int kSub = 8;                  // tokens per sub-chunk (the recomputed states of one in registers)
constexpr int kNSub = kChunk / kSub;     // 4
constexpr int kWarps = 2 * kHeads;       // warp w = (head w / 2, n-tile w % 2)
constexpr int kThreads = 32 * kWarps;    // 256

template <typename T>
struct SmemB7 {
  struct Raw {
    typename scan7::Smem7<T>::Raw f;     // x, B, dt (the group's), z, C (4 heads): the forward v7's staging
    alignas(16) T dy[kHeads][kChunk][kN];
    alignas(16) T xh[4][kN];             // x rows t0-3 .. t0-1 (row 3 unused)
  };
  struct Head {                          // one head's sub-chunk items; [t][c] = (sub-chunk token, channel)
    alignas(16) float2 cop[kSub / 2][2][9];  // C as the k4 B operand per token pair and n-tile: (C_t[8 nt + g],
                                             // C_t+1[8 nt + g]); entry 8 = zeros (lanes q > 0)
    alignas(16) float2 du[kSub][kN];       // (tf32(delta u), delta); 0 past the sequence end
    alignas(16) float dys[kSub][kN];       // tf32(dy silu(z))
    alignas(16) float u[kSub][kN];         // silu(conv)
    alignas(16) float dsc[kSub][kN];       // silu'(conv pre-activation)
    alignas(16) float dsp[kSub][kN];       // softplus'(dt_pre + 2 b_dt)
    alignas(16) float dzf[kSub][kN];       // dy silu'(z)
    alignas(16) float dco[kSub + 3][kN];   // d(conv pre-activation); rows 8..10 = the next sub-chunk's rows 0..2
    alignas(16) float dxs[kSub][kN];       // d(conv input) (fused group sums only)
    alignas(16) float4 cw[kN];             // right-aligned conv taps per channel
    alignas(16) float4 cp[kN];             // (conv bias, 2 b_dt, D, 0) per channel
    alignas(16) float acc[kN][8];          // end of sequence: the n-tile 1 warp's per-channel sums
  };
  struct Warp {                            // per (head, n-tile): partial state sums over the warp's 8 states
    alignas(16) float yc[kSub][kN];        // readout C . h
    alignas(16) float4 ppu[kSub][8];       // (pp, pp, pu, pu) of channels 2g, 2g + 1
    alignas(16) float red[kSub][kN];       // per token: dB (states 8 nt .. + 7) then dC (the same states)
    alignas(16) float4 bst[kNSub - 1][32]; // states after tokens 7, 15, 23 of the tile, per lane (pass A)
  };
  Raw raw[2];                                    // by tile parity
  alignas(16) float xf[kChunk + 3][kN];          // conv input fp32; row i = position t0 - 3 + i
  alignas(16) float2 bop[kChunk / 2][2][9];      // B as the k4 B operand per token pair and n-tile; entry 8 = zeros
  Head hd[kHeads];
  Warp wp[kWarps];
};

// The tile starting at t0: the forward v7's 11 slices (threads 0..127), dy of the 4 heads (one 16-byte copy per
// thread) and the 3 x rows before t0.
template <typename T>
__device__ __forceinline__ void stage(const MixerScanParams& p, typename SmemB7<T>::Raw& r, int b, int head0,
                                      int group, int t0, int tid) {
  constexpr int kVec = 16 / sizeof(T);
  if (tid < scan7::kThreads) scan7::stage<T>(p, r.f, b, head0, group, t0, tid);
  const T* dyb = static_cast<const T*>(p.dy) + (int64_t)b * p.seqlen * p.d_inner + head0 * kN;
  {  // 4 heads x 32 rows x 2 parts = 256 copies
    const int hh = tid >> 6, row = (tid >> 1) & 31, part = tid & 1, pos = t0 + row;
    const bool ok = pos < p.seqlen;
    scan4::cp_async16(&r.dy[hh][row][part * kVec], ok ? dyb + (int64_t)pos * p.d_inner + hh * kN + part * kVec : dyb, ok);
  }
  if (tid >= 128 && tid < 134) {
    const int row = (tid - 128) >> 1, part = tid & 1, pos = t0 - 3 + row;
    const bool ok = pos >= 0;
    const T* zx = static_cast<const T*>(p.zxbc) + (int64_t)b * p.zxbc_batch_stride;
    const T* src = zx + (ok ? (int64_t)pos * p.zxbc_row_stride + p.d_inner + group * kN + part * kVec : 0);
    scan4::cp_async16(&r.xh[row][part * kVec], src, ok);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) mixer_scan_bwd7_kernel(MixerScanParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  using SM = SmemB7<T>;
  using M = scan4::MmaOp<T>;
  SM& sm = *reinterpret_cast<SM*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, hl = w >> 1, nt = w & 1, g = lane >> 2, q = lane & 3;
  const int head0 = blockIdx.x * kHeads, b = blockIdx.y, head = head0 + hl, c0 = head * kN;
  const int group = head0 / p.heads_per_group;
  const int D = p.d_inner, L = p.seqlen, R = p.dt_rank, W = p.width, hw = W - 1;
  const int n_tiles = p.n_chunks;
  const int64_t rowZ = 2 * (int64_t)D + 2 * p.d_xb;
  typename SM::Head& hd = sm.hd[hl];
  typename SM::Warp& wp = sm.wp[w];
  // The two warps of a head meet at named barrier 1 + hl (0 is __syncthreads).
  auto pair_sync = [&] { asm volatile("bar.sync %0, %1;" ::"r"(1 + hl), "r"(64) : "memory"); };

  stage<T>(p, sm.raw[(n_tiles - 1) & 1], b, head0, group, (n_tiles - 1) * kChunk, tid);
  scan4::cp_async_commit();

  // Per-channel constants (smem: the registers go to the recomputed states), zero operand entries, dco halo.
  if (nt == 0 && lane < kN) {
    const int pc = c0 + lane, wch = p.repeat_before_conv ? pc : group * kN + lane;
    float cw[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int src = i - (4 - W);
      cw[i] = src >= 0 ? p.conv_w[wch * W + src] : 0.f;
    }
    hd.cw[lane] = make_float4(cw[0], cw[1], cw[2], cw[3]);
    hd.cp[lane] = make_float4(p.conv_b != nullptr ? p.conv_b[wch] : 0.f, 2.f * p.dt_b[pc], p.Dskip[pc], 0.f);
  }
  if (nt == 1 && lane < kSub) hd.cop[lane >> 1][lane & 1][8] = make_float2(0.f, 0.f);
  if (nt == 1) {
    for (int i = lane; i < 3 * kN; i += 32) hd.dco[kSub + i / kN][i % kN] = 0.f;  // past the sequence end
  }
  if (tid < kChunk) sm.bop[tid >> 1][tid & 1][8] = make_float2(0.f, 0.f);
  // dt_proj B fragments of this warp's n-tile (the forward v7's column labels: lane q's prep items are channels
  // 4q + 2 nt + e).
  unsigned wb[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int k = hf * 8 + 2 * q;
    const int64_t row = (int64_t)(c0 + 4 * (g >> 1) + 2 * nt + (g & 1)) * R;
    wb[hf] = M::pack(k < R ? p.dt_w[row + k] : 0.f, k + 1 < R ? p.dt_w[row + k + 1] : 0.f);
  }
  // Scan constants / state: element i = channel 2g + (i >> 1), state 8 nt + 2q + (i & 1).
  float An[4], A2[4], carry[4], dAacc[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int cs = c0 + 2 * g + (i >> 1), n = nt * 8 + 2 * q + (i & 1);
    An[i] = -__expf(p.A_log[cs * kN + n]);
    A2[i] = An[i] * kLog2e;
    carry[i] = p.dfinal_ssm != nullptr ? p.dfinal_ssm[((int64_t)b * D + cs) * kN + n] : 0.f;
    dAacc[i] = 0.f;
  }
  // Epilogue mapping: channel ec, sub-chunk tokens et0, et0 + 1; per-channel sums over the sequence.
  const int ec = lane & 15, et0 = 4 * nt + 2 * (lane >> 4);
  float accD = 0.f, accCB = 0.f, accW[4] = {0.f, 0.f, 0.f, 0.f};
  const int bsel = q == 0 ? g : 8;  // lanes q > 0 read the zero entry: rows k >= 1 of a k4 B operand
  // Reverse: the reduce-scatter's lane bits (which = bit 4: dB / dC, s = bit 3), this lane's slot in red, the pp
  // diagonal lane.
  const bool b4 = (lane >> 4) & 1, b3 = (lane >> 3) & 1;
  const int red_slot = 8 * b4 + 2 * q + b3;
  const bool diag = q == (g >> 1), godd = g & 1;
  const bool fused = p.bwd_fused_sums;
  T* dzx = static_cast<T*>(p.dzxbc) + (int64_t)b * L * rowZ;
  auto load_state = [&](const float* base, float (&h)[4]) {  // base = (D, 16) block of this sequence
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float2 v = *reinterpret_cast<const float2*>(base + (int64_t)(c0 + 2 * g + r) * kN + nt * 8 + 2 * q);
      h[2 * r] = v.x;
      h[2 * r + 1] = v.y;
    }
  };

  for (int tile = n_tiles - 1; tile >= 0; --tile) {
    const int t0 = tile * kChunk, par = tile & 1, Tv = min(kChunk, L - t0);
    const typename SM::Raw& r = sm.raw[par];
    scan4::cp_async_wait_all();
    __syncthreads();  // S1
    if (tile > 0) {
      stage<T>(p, sm.raw[par ^ 1], b, head0, group, t0 - kChunk, tid);
      scan4::cp_async_commit();
    }
    if (tid < 128) {  // A (block): x -> fp32, halo rows, B operand table
      const int row = tid / 4, part = tid % 4;
      const uint2 wx = *reinterpret_cast<const uint2*>(&r.f.x[row][part * 4]);
      const float2 x01 = scan4::unpack2<T>(wx.x), x23 = scan4::unpack2<T>(wx.y);
      *reinterpret_cast<float4*>(&sm.xf[3 + row][part * 4]) = make_float4(x01.x, x01.y, x23.x, x23.y);
      if (tid < 3 * kN) {
        const int hr = tid / kN, ch = tid % kN;
        float v;
        if (t0 > 0) {
          v = to_f(r.xh[hr][ch]);
        } else {
          const int kk = hw + hr - 3;  // index into the last W-1 entries of the initial conv state
          v = (p.init_conv != nullptr && kk >= 0) ? p.init_conv[((int64_t)b * p.d_xb + group * kN + ch) * hw + kk] : 0.f;
        }
        sm.xf[hr][ch] = v;
      }
      const int pr = tid / 8, bg = tid % 8;
      sm.bop[pr][0][bg] = make_float2(to_f(r.f.B[2 * pr][bg]), to_f(r.f.B[2 * pr + 1][bg]));
      sm.bop[pr][1][bg] = make_float2(to_f(r.f.B[2 * pr][bg + 8]), to_f(r.f.B[2 * pr + 1][bg + 8]));
    }
    __syncthreads();  // S2

    // Prep of sub-chunk j (tile tokens 8j .. 8j + 7), split over the head's 2 warps: lane (g, q) of warp nt =
    // token 8j + g, channels 4q + 2 nt + e (e < 2). kFull: also the reverse / epilogue items and the C operand
    // table; else (delta, du) only (pass A).
    auto prep = [&](int j, auto full_tag) {
      constexpr bool kFull = decltype(full_tag)::value;
      const int tl = g, t = kSub * j + tl, cA = 4 * q + 2 * nt;
      const bool live = t < Tv;
      unsigned a[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int k = (i >> 1) * 8 + 2 * q;  // rows g and g + 8 of the m16 tile both hold token t
        a[i] = k < R ? *reinterpret_cast<const unsigned*>(&r.f.dt[t][k]) : 0u;
      }
      float dd[4] = {0.f, 0.f, 0.f, 0.f};
      M::run(dd, a, wb);
      float2 xs[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) xs[k] = *reinterpret_cast<const float2*>(&sm.xf[t + k][cA]);
      float2 zv = make_float2(0.f, 0.f), dyv = make_float2(0.f, 0.f);
      if constexpr (kFull) {
        zv = scan4::unpack2<T>(*reinterpret_cast<const unsigned*>(&r.f.z[hl][t][cA]));
        dyv = scan4::unpack2<T>(*reinterpret_cast<const unsigned*>(&r.dy[hl][t][cA]));
      }
      float o_du[2], o_dl[2], o_dys[2], o_u[2], o_dsc[2], o_dsp[2], o_dzf[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float4 cwv = hd.cw[cA + e], cpv = hd.cp[cA + e];
        auto comp = [&](const float2& v) { return e == 0 ? v.x : v.y; };
        float cv = cpv.x;
        cv = fmaf(cwv.x, comp(xs[0]), cv);
        cv = fmaf(cwv.y, comp(xs[1]), cv);
        cv = fmaf(cwv.z, comp(xs[2]), cv);
        cv = fmaf(cwv.w, comp(xs[3]), cv);
        const float sc = sigmoid_fast(cv), u = cv * sc;
        const float dp = dd[e] + cpv.y;
        const float delta = scan4::softplus_select(dp);
        o_du[e] = live ? tf32_rna(delta * u) : 0.f;
        o_dl[e] = live ? delta : 0.f;
        if constexpr (kFull) {
          const float zz = e == 0 ? zv.x : zv.y, dy = e == 0 ? dyv.x : dyv.y, sz = sigmoid_fast(zz);
          o_dys[e] = tf32_rna(dy * zz * sz);  // 0 past the end (dy rows zero-filled)
          o_dzf[e] = dy * sz * (1.f + zz * (1.f - sz));
          o_u[e] = u;
          o_dsc[e] = sc * (1.f + cv * (1.f - sc));
          o_dsp[e] = dp > 20.f ? 1.f : sigmoid_fast(dp);
        }
      }
      *reinterpret_cast<float4*>(&hd.du[tl][cA]) = make_float4(o_du[0], o_dl[0], o_du[1], o_dl[1]);
      if constexpr (kFull) {
        *reinterpret_cast<float2*>(&hd.dys[tl][cA]) = make_float2(o_dys[0], o_dys[1]);
        *reinterpret_cast<float2*>(&hd.u[tl][cA]) = make_float2(o_u[0], o_u[1]);
        *reinterpret_cast<float2*>(&hd.dsc[tl][cA]) = make_float2(o_dsc[0], o_dsc[1]);
        *reinterpret_cast<float2*>(&hd.dsp[tl][cA]) = make_float2(o_dsp[0], o_dsp[1]);
        *reinterpret_cast<float2*>(&hd.dzf[tl][cA]) = make_float2(o_dzf[0], o_dzf[1]);
        // C operand: 4 pairs x 8 entries of this warp's n-tile
        const int pr = lane >> 3, gg = lane & 7, tc = kSub * j + 2 * pr;
        hd.cop[pr][nt][gg] = make_float2(to_f(r.f.C[hl][tc][8 * nt + gg]), to_f(r.f.C[hl][tc + 1][8 * nt + gg]));
      }
    };

    // Recompute of sub-chunk j from h (updated in place); kFull: keep the states and the readout partial.
    auto recompute = [&](int j, float (&h)[4], float (&hs)[kSub][4], auto full_tag) {
      constexpr bool kFull = decltype(full_tag)::value;
#pragma unroll
      for (int tl = 0; tl < kSub; ++tl) {
        const int t = kSub * j + tl;
        const float4 pd = *reinterpret_cast<const float4*>(&hd.du[tl][2 * g]);  // (du, delta) of 2g, 2g + 1
        const float2 bo = sm.bop[t >> 1][nt][bsel];
        float db[4];
        mma_k4(db, pd.x, pd.z, (tl & 1) ? bo.y : bo.x);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float a = ex2((i < 2 ? pd.y : pd.w) * A2[i]);
          h[i] = fmaf(a, h[i], db[i]);
          if constexpr (kFull) hs[tl][i] = h[i];
        }
        if constexpr (kFull) {
          const unsigned cwd = reinterpret_cast<const unsigned*>(&r.f.C[hl][t][0])[4 * nt + q];
          const float2 cl = scan4::unpack2<T>(cwd);
          float yv[4];
          mma_k8(yv, h[0], h[2], h[1], h[3], cl.x, cl.y, 0.f, 0.f, 0.f, 0.f);
          *reinterpret_cast<float2*>(&wp.yc[tl][2 * g]) = make_float2(yv[0], yv[2]);  // the 4 q lanes: same value
        }
      }
    };

    const float* ck = p.ckpt_in + ((int64_t)b * n_tiles + tile) * D * kN;
    // Pass A: the states after tokens 7, 15, 23 (only the sub-chunks before the last one are needed).
    {
      float h[4], hs_unused[kSub][4];
      load_state(ck, h);
#pragma unroll 1
      for (int j = 0; j < kNSub - 1; ++j) {
        prep(j, std::false_type{});
        pair_sync();
        recompute(j, h, hs_unused, std::false_type{});
        wp.bst[j][lane] = make_float4(h[0], h[1], h[2], h[3]);
        pair_sync();  // the next prep overwrites du
      }
    }

    // Pass B: sub-chunks in reverse.
#pragma unroll 1
    for (int j = kNSub - 1; j >= 0; --j) {
      prep(j, std::true_type{});
      float hstart[4];
      if (j == 0) {
        load_state(ck, hstart);
      } else {
        const float4 v = wp.bst[j - 1][lane];
        hstart[0] = v.x; hstart[1] = v.y; hstart[2] = v.z; hstart[3] = v.w;
      }
      pair_sync();
      float hs[kSub][4];
      {
        float h[4] = {hstart[0], hstart[1], hstart[2], hstart[3]};
        recompute(j, h, hs, std::true_type{});
      }

      // Reverse over the sub-chunk's tokens.
#pragma unroll
      for (int tl = kSub - 1; tl >= 0; --tl) {
        const int t = kSub * j + tl;
        const float4 pd = *reinterpret_cast<const float4*>(&hd.du[tl][2 * g]);  // (du0, delta0, du1, delta1)
        const float2 dy2 = *reinterpret_cast<const float2*>(&hd.dys[tl][2 * g]);
        const float2 cc = hd.cop[tl >> 1][nt][bsel];
        const float2 bl = scan4::unpack2<T>(reinterpret_cast<const unsigned*>(&r.f.B[t][0])[4 * nt + q]);
        // G = carry + dys (x) C: the carry enters as the accumulator
        float G[4];
        mma_k4c(G, dy2.x, dy2.y, (tl & 1) ? cc.y : cc.x, carry);
        float qv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float dl = i < 2 ? pd.y : pd.w;
          const float ga = G[i] * ex2(dl * A2[i]);
          const float hp = tl > 0 ? hs[tl > 0 ? tl - 1 : 0][i] : hstart[i];
          qv[i] = ga * hp;  // d/d(delta A) of h_t = a h_{t-1}: G a h_{t-1}
          dAacc[i] = fmaf(qv[i], dl, dAacc[i]);  // x A at the end
          carry[i] = ga;
        }
        float pe[4], po[4], pu[4];
        mma_k8(pe, qv[0], qv[2], qv[1], qv[3], An[0], An[1], 0.f, 0.f, 0.f, 0.f);
        mma_k8(po, qv[0], qv[2], qv[1], qv[3], An[2], An[3], 0.f, 0.f, 0.f, 0.f);
        mma_k8(pu, G[0], G[2], G[1], G[3], bl.x, bl.y, 0.f, 0.f, 0.f, 0.f);
        if (diag) wp.ppu[tl][g] = make_float4(godd ? pe[1] : pe[0], godd ? po[3] : po[2], pu[0], pu[2]);
        // Channel sums of (dB: G du, dC: dys h) per state 2q + s, the lane's 2 channels pre-added; then a
        // reduce-scatter over lane bits 4, 3 and a sum over bit 2: lane keeps (which = bit 4, s = bit 3).
        const float vB0 = fmaf(G[0], pd.x, G[2] * pd.z), vB1 = fmaf(G[1], pd.x, G[3] * pd.z);
        const float vC0 = fmaf(hs[tl][0], dy2.x, hs[tl][2] * dy2.y), vC1 = fmaf(hs[tl][1], dy2.x, hs[tl][3] * dy2.y);
        const float k0 = (b4 ? vC0 : vB0) + __shfl_xor_sync(0xffffffffu, b4 ? vB0 : vC0, 16);
        const float k1 = (b4 ? vC1 : vB1) + __shfl_xor_sync(0xffffffffu, b4 ? vB1 : vC1, 16);
        const float k2 = (b3 ? k1 : k0) + __shfl_xor_sync(0xffffffffu, b3 ? k0 : k1, 8);
        wp.red[tl][red_slot] = k2 + __shfl_xor_sync(0xffffffffu, k2, 4);  // bit-2 partners store the same value
      }
      pair_sync();

      // Epilogue per (channel ec, token): dz, d(dt_pre), d(conv pre-activation), per-channel sums.
      {
        const float Dc = hd.cp[ec].z;
        const typename SM::Warp& w0 = sm.wp[2 * hl];
        const typename SM::Warp& w1 = sm.wp[2 * hl + 1];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int tl = et0 + i, t = kSub * j + tl, tg = t0 + t;
          const float4 pa = w0.ppu[tl][ec >> 1], pb = w1.ppu[tl][ec >> 1];
          const float pp = (ec & 1) ? pa.y + pb.y : pa.x + pb.x, pu = (ec & 1) ? pa.w + pb.w : pa.z + pb.z;
          const float delta = hd.du[tl][ec].y, u = hd.u[tl][ec], dys = hd.dys[tl][ec];
          const float yfull = fmaf(Dc, u, w0.yc[tl][ec] + w1.yc[tl][ec]);
          const float dz = yfull * hd.dzf[tl][ec];
          const float ddt = fmaf(u, pu, pp) * hd.dsp[tl][ec];
          const float dut = fmaf(delta, pu, dys * Dc);
          const bool live = t < Tv;
          const float dco = live ? dut * hd.dsc[tl][ec] : 0.f;
          hd.dco[tl][ec] = dco;
          if (live) {
            accD = fmaf(dys, u, accD);
            accCB += dco;
#pragma unroll
            for (int k = 0; k < 4; ++k) accW[k] = fmaf(dco, sm.xf[t + k][ec], accW[k]);
            dzx[(int64_t)tg * rowZ + c0 + ec] = from_f<T>(dz);
            p.ddt_pre[((int64_t)b * L + tg) * D + c0 + ec] = ddt;
          }
        }
      }
      pair_sync();
      {  // transposed conv: d(conv input) at token t = sum_i w[i] dco[t + 3 - i]
        const float4 cwv = hd.cw[ec];
        const float wv[4] = {cwv.x, cwv.y, cwv.z, cwv.w};
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int tl = et0 + i, t = kSub * j + tl, tg = t0 + t;
          float acc = 0.f;
#pragma unroll
          for (int k = 0; k < 4; ++k) acc = fmaf(wv[k], hd.dco[tl + 3 - k][ec], acc);
          if (fused) hd.dxs[tl][ec] = acc;
          else if (t < Tv) p.dx_part[((int64_t)b * L + tg) * D + c0 + ec] = acc;
        }
        const int di = lane + 32 * nt;  // gradient of the initial conv state: positions -hw .. -1
        if (tile == 0 && j == 0 && di < kN * hw) {
          const int ch = di / hw, kk = di % hw, pos = kk - hw;
          const float4 cw2 = hd.cw[ch];
          const float w2[4] = {cw2.x, cw2.y, cw2.z, cw2.w};
          float acc = 0.f;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int row = pos + 3 - i;
            if (row >= 0 && row < Tv) acc = fmaf(w2[i], hd.dco[row][ch], acc);
          }
          p.dinit_conv_part[((int64_t)b * D + c0 + ch) * hw + kk] = acc;
        }
      }
      const int64_t row0 = (int64_t)b * L + t0 + kSub * j;  // first (b, L) row of the sub-chunk
      if (lane < kSub) {  // dC of the warp's 8 states (complete per head): one 16-byte store per token
        const int tl = lane;
        const float4 lo = *reinterpret_cast<const float4*>(&wp.red[tl][8]);
        const float4 hi = *reinterpret_cast<const float4*>(&wp.red[tl][12]);
        if (kSub * j + tl < Tv)
          *reinterpret_cast<uint4*>(dzx + (int64_t)(t0 + kSub * j + tl) * rowZ + D + 2 * p.d_xb + c0 + 8 * nt) =
              make_uint4(M::pack(lo.x, lo.y), M::pack(lo.z, lo.w), M::pack(hi.x, hi.y), M::pack(hi.z, hi.w));
      } else if (!fused && lane < 3 * kSub) {  // dB of the head's 8 states: token, half
        const int tl = (lane - kSub) >> 1, hf = lane & 1;
        if (kSub * j + tl < Tv)
          *reinterpret_cast<float4*>(p.dB_part + ((row0 + tl) * (D / kN) + head) * kN + 8 * nt + 4 * hf) =
              *reinterpret_cast<const float4*>(&wp.red[tl][4 * hf]);
      }
      pair_sync();  // transposed-conv reads of dco done (both warps) before its halo rows move
      if (nt == 0) {
        for (int i = lane; i < 3 * kN; i += 32) hd.dco[kSub + i / kN][i % kN] = hd.dco[i / kN][i % kN];
      }
      if (fused) {
        // The group's 4 heads are this block's warps: sum their dB and d(conv input) (fixed order) and write
        // dzxbc's B / x slices. dfinal_conv enters at the last width-1 positions (x inputs of the final state).
        __syncthreads();
        if (tid < 128) {
          const int hx = tid >> 6, i = tid & 63, tl = i >> 3, pr = i & 7, tg = t0 + kSub * j + tl;
          float s0 = 0.f, s1 = 0.f;
#pragma unroll
          for (int hh = 0; hh < kHeads; ++hh) {
            const float2 v = hx == 0 ? *reinterpret_cast<const float2*>(&sm.wp[2 * hh + (pr >> 2)].red[tl][2 * (pr & 3)])
                                     : *reinterpret_cast<const float2*>(&sm.hd[hh].dxs[tl][2 * pr]);
            s0 += v.x;
            s1 += v.y;
          }
          if (hx == 1 && p.dfinal_conv != nullptr && tg >= L - hw) {
            const float* dfc = p.dfinal_conv + ((int64_t)b * p.d_xb + group * kN + 2 * pr) * hw + (tg - (L - hw));
            s0 += dfc[0];
            s1 += dfc[hw];
          }
          if (tg < L)
            *reinterpret_cast<unsigned*>(dzx + (int64_t)tg * rowZ + D + (hx == 0 ? p.d_xb : 0) + group * kN + 2 * pr) =
                M::pack(s0, s1);
        }
        __syncthreads();
      } else {
        __syncwarp();  // red is rewritten by the next reverse
      }
    }
  }

  // Whole-sequence outputs.
#pragma unroll
  for (int r2 = 0; r2 < 2; ++r2) {
    const int64_t o = ((int64_t)b * D + c0 + 2 * g + r2) * kN + nt * 8 + 2 * q;
    *reinterpret_cast<float2*>(p.dA_log_part + o) = make_float2(dAacc[2 * r2] * An[2 * r2], dAacc[2 * r2 + 1] * An[2 * r2 + 1]);
    *reinterpret_cast<float2*>(p.dinit_ssm + o) = make_float2(carry[2 * r2], carry[2 * r2 + 1]);
  }
  // Per-channel sums: lanes ec and ec + 16 of both warps of the head.
  accD += __shfl_xor_sync(0xffffffffu, accD, 16);
  accCB += __shfl_xor_sync(0xffffffffu, accCB, 16);
#pragma unroll
  for (int i = 0; i < 4; ++i) accW[i] += __shfl_xor_sync(0xffffffffu, accW[i], 16);
  if (nt == 1 && lane < kN) {
    hd.acc[lane][0] = accD; hd.acc[lane][1] = accCB;
#pragma unroll
    for (int i = 0; i < 4; ++i) hd.acc[lane][2 + i] = accW[i];
  }
  pair_sync();
  if (nt == 0 && lane < kN) {
    const int64_t c = (int64_t)b * D + c0 + ec;
    p.dD_part[c] = accD + hd.acc[lane][0];
    p.dconv_b_part[c] = accCB + hd.acc[lane][1];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int src = i - (4 - W);
      if (src >= 0) p.dconv_w_part[c * W + src] = accW[i] + hd.acc[lane][2 + i];
    }
  }
}

template <typename T>
void launch(const MixerScanParams& p, void* stream) {
  const size_t smem = sizeof(SmemB7<T>);
  auto kernel = mixer_scan_bwd7_kernel<T>;
  static bool configured = false;  // a race here only repeats an idempotent call
  if (!configured) {
    APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           (int)cudaSharedmemCarveoutMaxShared));
    configured = true;
  }
  dim3 grid(p.d_inner / (kN * kHeads), p.batch);
  kernel<<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace scan7b

template <typename T>
void launch_mixer_scan_bwd7(const MixerScanParams& p, void* stream) {
  scan7b::launch<T>(p, stream);
}

}  // namespace apriel
