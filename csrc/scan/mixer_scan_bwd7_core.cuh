// The v7 backward's per-warp core (session 26): one warp = one head of 16 channels x 16 states in the mma accumulator
// layout (lane (g = lane / 4, q = lane % 4): channels 2g, 2g + 1 x states {2q, 2q + 1, 8 + 2q, 9 + 2q}), an 8-token
// sub-chunk at a time - the recompute of its states (recompute_sub) and the reverse (adjoint) over them (reverse_sub).
// The design, its measurements and the kernels around it: mixer_scan_bwd7.cuh (the mixer scan) and
// ../sscan/sscan_bwd7.cuh (the generic selective scan). What the callers give the core, per warp and sub-chunk j:
//   du[tl][c]   (tf32(delta u), delta) per (sub-chunk token, channel); (0, 0) past the sequence end
//   dys[tl][c]  tf32(dy gate) (the reverse's readout adjoint)
//   bop / cop   B / C of the tile as the k4 B operand per token pair (entry 8: zeros): bop[t / 2] by tile token t,
//               cop[tl / 2] by sub-chunk token (the caller offsets it)
//   C / Braw    the tile's 16-bit C / B rows [tile token][state] (the readout's and sum_n G B's operands)
// and gets back: yc[tl][c] = C . h (kFull recompute), ppu[tl][c / 2] = (pp, pp, pu, pu) of the channel pair
// (pp = sum_n G a h_{t-1} A: d delta through the decay; pu = sum_n G B: d(delta u)), red[tl][32] = the head's
// channel sums per token (dB: states 0..15, dC: 16..31), and the carried adjoint / dA accumulators in registers.
#pragma once
#include "mixer_scan_fwd7.cuh"  // scan7:: mma_k4, mma_k8, tf32_rna; scan:: ex2, kChunk, kN

namespace apriel {
namespace scan7b {

using scan::kChunk;
using scan::kN;
using scan7::mma_k4;
using scan7::mma_k8;

// d = A (16 x 4, every column a0 / a1) * B (row 0 = b0) + c: mma_k4 with an accumulator input.
__device__ __forceinline__ void mma_k4c(float (&d)[4], float a0, float a1, float b0, const float (&c)[4]) {
  asm("mma.sync.aligned.m16n8k4.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(__float_as_uint(a0)), "r"(__float_as_uint(a1)), "r"(__float_as_uint(b0)), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
}

// v = hi + lo, hi = v truncated to tf32 (mask: 1 instruction; cvt.rna is ~6), lo = the rest (the mma truncates it:
// relative error ~2^-21): two mmas (hi, lo) give a product near fp32 accuracy (3xTF32 without the lo x lo term, the
// other operand being exact in tf32).
__device__ __forceinline__ void tf32_split(float v, float& hi, float& lo) {
  hi = __uint_as_float(__float_as_uint(v) & 0xffffe000u);
  lo = v - hi;
}

// d = A (16 x 8) * B (8 x 8) + c, tf32 operands given as 32-bit floats.
__device__ __forceinline__ void mma_k8c(float (&d)[4], const float (&a)[4], float b0, float b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])), "r"(__float_as_uint(a[3])),
        "r"(__float_as_uint(b0)), "r"(__float_as_uint(b1)));
}

// A lane's 8 decays of one token, a = exp(delta A) = ex2(delta A log2 e), element [nt][i] = channel 2g + (i >> 1)
// (delta0 / delta1 of channels 2g / 2g + 1), state 8 nt + 2q + (i & 1): the recompute's and the reverse's fronts.
__device__ __forceinline__ void decays(float delta0, float delta1, const float (&A2)[2][4], float (&a)[2][4]) {
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) a[nt][i] = ex2((i < 2 ? delta0 : delta1) * A2[nt][i]);
}

constexpr int kSub = 8;                  // tokens per sub-chunk (the recomputed states of one in registers)
constexpr int kNSub = kChunk / kSub;     // 4

// The lane's 8 state elements (channels c0 + 2g, + 1) from a (D, 16) fp32 block of one sequence: a checkpoint, a
// carry.
__device__ __forceinline__ void load_state(const float* base, int c0, int g, int q, float (&h)[2][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const float2 v = *reinterpret_cast<const float2*>(base + (int64_t)(c0 + 2 * g + r) * kN + nt * 8 + 2 * q);
      h[nt][2 * r] = v.x;
      h[nt][2 * r + 1] = v.y;
    }
}

// Pass A keeps the state after each sub-chunk but the last, per lane (bst[j] = after sub-chunk j); pass B starts
// sub-chunk j from bst[j - 1], or from the tile's checkpoint (ck) at j = 0.
__device__ __forceinline__ void store_sub_state(float4 (*bst)[2][32], int j, int lane, const float (&h)[2][4]) {
  bst[j][0][lane] = make_float4(h[0][0], h[0][1], h[0][2], h[0][3]);
  bst[j][1][lane] = make_float4(h[1][0], h[1][1], h[1][2], h[1][3]);
}
__device__ __forceinline__ void sub_start_state(const float4 (*bst)[2][32], int j, int lane, const float* ck, int c0,
                                                int g, int q, float (&h)[2][4]) {
  if (j == 0) {
    load_state(ck, c0, g, q, h);
  } else {
    const float4 lo = bst[j - 1][0][lane], hi = bst[j - 1][1][lane];
    h[0][0] = lo.x; h[0][1] = lo.y; h[0][2] = lo.z; h[0][3] = lo.w;
    h[1][0] = hi.x; h[1][1] = hi.y; h[1][2] = hi.z; h[1][3] = hi.w;
  }
}

// The recompute of sub-chunk j (tile tokens kSub j ..) from h (updated in place); kFull: keep the states (hs) and the
// readout (yc).
template <typename T, bool kFull>
__device__ __forceinline__ void recompute_sub(int j, const float2 (*du)[kN], const float4 (*bop)[9], int bsel,
                                              const T (*C)[kN], float (*yc)[kN], const float (&A2)[2][4],
                                              float (&h)[2][4], float (&hs)[kSub][2][4], int g, int q) {
  // front(tl): the token's operands, dBu mmas and exponentials (none depends on h)
  auto front = [&](int tl, float (&a)[2][4], float (&db)[2][4]) {
    const int t = kSub * j + tl;
    const float4 pd = *reinterpret_cast<const float4*>(&du[tl][2 * g]);  // (du, delta) of 2g, 2g + 1
    const float4 bo = bop[t >> 1][bsel];
    mma_k4(db[0], pd.x, pd.z, (tl & 1) ? bo.z : bo.x);
    mma_k4(db[1], pd.x, pd.z, (tl & 1) ? bo.w : bo.y);
    decays(pd.y, pd.w, A2, a);
  };
  // token tl + 1's front is issued before token tl's update: the MUFU and mma latencies overlap the h chain
  // (session 8: bwd b8 L4096 -2 % alone, -5.5 % with the reverse's front; bench/results/s8/variants*)
  float fa[2][2][4], fdb[2][2][4];  // by token parity
  front(0, fa[0], fdb[0]);
#pragma unroll
  for (int tl = 0; tl < kSub; ++tl) {
    const int t = kSub * j + tl, cur = tl & 1;
    if (tl + 1 < kSub) front(tl + 1, fa[cur ^ 1], fdb[cur ^ 1]);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        h[nt][i] = fmaf(fa[cur][nt][i], h[nt][i], fdb[cur][nt][i]);
        if constexpr (kFull) hs[tl][nt][i] = h[nt][i];
      }
    if constexpr (kFull) {
      const unsigned* cwd = reinterpret_cast<const unsigned*>(&C[t][0]);
      const float2 clo = scan4::unpack2<T>(cwd[q]), chi = scan4::unpack2<T>(cwd[4 + q]);
      float yv[4];
      mma_k8(yv, h[0][0], h[0][2], h[0][1], h[0][3], clo.x, clo.y, 0.f, 0.f, 0.f, 0.f);
      mma_k8(yv, h[1][0], h[1][2], h[1][1], h[1][3], chi.x, chi.y, yv[0], yv[1], yv[2], yv[3]);
      *reinterpret_cast<float2*>(&yc[tl][2 * g]) = make_float2(yv[0], yv[2]);  // the 4 q lanes: same value
    }
  }
}

// Pass B's recompute of sub-chunk j from its start state (kept), into hs and the readout yc.
template <typename T>
__device__ __forceinline__ void recompute_kept(int j, const float2 (*du)[kN], const float4 (*bop)[9], int bsel,
                                               const T (*C)[kN], float (*yc)[kN], const float (&A2)[2][4],
                                               const float (&hstart)[2][4], float (&hs)[kSub][2][4], int g, int q) {
  float h[2][4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) h[nt][i] = hstart[nt][i];
  recompute_sub<T, true>(j, du, bop, bsel, C, yc, A2, h, hs, g, q);
}

// The reverse's per-lane constants: the reduce-scatter's lane bits, the lane's slot in red (which * 16 + state), the
// pp diagonal lane. (The caller computes them once; as a constructor here they cost the mixer kernel 8 more bytes of
// spill.)
struct RevLane {
  bool b4, b3, b2;
  int red_slot;
  bool diag, godd;
};
__device__ __forceinline__ RevLane rev_lane(int lane) {
  const int g = lane / 4, q = lane % 4;
  const bool b4 = (lane >> 4) & 1, b3 = (lane >> 3) & 1, b2 = (lane >> 2) & 1;
  return RevLane{b4, b3, b2, 16 * b4 + 8 * b3 + 2 * q + b2, q == (g >> 1), (g & 1) != 0};
}

// The reverse over sub-chunk j's tokens (kSub - 1 .. 0) from its recomputed states hs (hstart: the state before its
// first token): G_t = carry + dys_t (x) C_t; carry' = G_t a_t; q = carry' h_{t-1}, dAacc += q delta; pp / pu into
// ppu; the channel sums into red. (Packed documents: delta = FLT_MAX at a start gives a = 0 and q = 0 there.)
template <typename T, typename Warp>
__device__ __forceinline__ void reverse_sub(int j, Warp& wp, const T (*Braw)[kN], const RevLane& rl,
                                            const float (&A2)[2][4], const float (&An)[2][4],
                                            const float (&hs)[kSub][2][4], const float (&hstart)[2][4],
                                            float (&carry)[2][4], float (&dAacc)[2][4], int g, int q) {
  const int csel = q == 0 ? g : 8;
  // rfront(tl): the token's operands and exponentials (none depends on the carry)
  struct RevOps {
    float4 pd;  // (du0, delta0, du1, delta1)
    float2 dy2, blo, bhi;
    float c0, c1;
    float a[2][4];
  };
  auto rfront = [&](int tl, RevOps& o) {
    const int t = kSub * j + tl;
    o.pd = *reinterpret_cast<const float4*>(&wp.du[tl][2 * g]);
    o.dy2 = *reinterpret_cast<const float2*>(&wp.dys[tl][2 * g]);
    const float4 cc = wp.cop4[tl >> 1][csel];
    o.c0 = (tl & 1) ? cc.z : cc.x;
    o.c1 = (tl & 1) ? cc.w : cc.y;
    const unsigned* bwd = reinterpret_cast<const unsigned*>(&Braw[t][0]);
    o.blo = scan4::unpack2<T>(bwd[q]);
    o.bhi = scan4::unpack2<T>(bwd[4 + q]);
    decays(o.pd.y, o.pd.w, A2, o.a);
  };
  // Channel sums of token tl: v = (dB: G du, dC: dys h) per (nt, state 2q + s), the lane's 2 channels pre-added;
  // a reduce-scatter over lane bits 4, 3, 2 (= g's bits): lane keeps (which = bit 4, nt = bit 3, s = bit 2).
  auto reduce_scatter = [&](const float (&v)[8], int tl) {
    float k1[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float keep = rl.b4 ? v[4 + k] : v[k], send = rl.b4 ? v[k] : v[4 + k];
      k1[k] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
    }
    float k2[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const float keep = rl.b3 ? k1[2 + k] : k1[k], send = rl.b3 ? k1[k] : k1[2 + k];
      k2[k] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
    }
    const float keep = rl.b2 ? k2[1] : k2[0], send = rl.b2 ? k2[0] : k2[1];
    wp.red[tl][rl.red_slot] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
  };
  // token tl - 1's front is issued before token tl's carry step (one token ahead; two ahead spilled and was
  // slower, as was issuing a token's reduce-scatter one token later: bench/results/s8/variants2)
  RevOps ops[2];  // by token parity
  rfront(kSub - 1, ops[(kSub - 1) & 1]);
#pragma unroll
  for (int tl = kSub - 1; tl >= 0; --tl) {
    if (tl > 0) rfront(tl - 1, ops[(tl - 1) & 1]);
    const RevOps& o = ops[tl & 1];
    const float4 pd = o.pd;
    const float2 dy2 = o.dy2, blo = o.blo, bhi = o.bhi;
    // G = carry + dys (x) C: the carry enters as the accumulator
    float G[2][4];
    mma_k4c(G[0], dy2.x, dy2.y, o.c0, carry[0]);
    mma_k4c(G[1], dy2.x, dy2.y, o.c1, carry[1]);
    float qv[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float dl = i < 2 ? pd.y : pd.w;  // (kSeq: FLT_MAX at a document start, where q = 0)
        const float ga = G[nt][i] * o.a[nt][i];
        const float hp = tl > 0 ? hs[tl > 0 ? tl - 1 : 0][nt][i] : hstart[nt][i];
        qv[nt][i] = ga * hp;  // d/d(delta A) of h_t = a h_{t-1}: G a h_{t-1}
        dAacc[nt][i] = fmaf(qv[nt][i], dl, dAacc[nt][i]);  // x A at the end
        carry[nt][i] = ga;
      }
    // pp[c] = sum_n q[c, n] A[c, n]: two mmas whose B columns are the A rows of the even / odd channels (the
    // lane's own An registers are those fragments); the wanted diagonal entries land in lane q = g / 2.
    float pe[4], po[4], pu[4];
    mma_k8(pe, qv[0][0], qv[0][2], qv[0][1], qv[0][3], An[0][0], An[0][1], 0.f, 0.f, 0.f, 0.f);
    mma_k8(pe, qv[1][0], qv[1][2], qv[1][1], qv[1][3], An[1][0], An[1][1], pe[0], pe[1], pe[2], pe[3]);
    mma_k8(po, qv[0][0], qv[0][2], qv[0][1], qv[0][3], An[0][2], An[0][3], 0.f, 0.f, 0.f, 0.f);
    mma_k8(po, qv[1][0], qv[1][2], qv[1][1], qv[1][3], An[1][2], An[1][3], po[0], po[1], po[2], po[3]);
    mma_k8(pu, G[0][0], G[0][2], G[0][1], G[0][3], blo.x, blo.y, 0.f, 0.f, 0.f, 0.f);
    mma_k8(pu, G[1][0], G[1][2], G[1][1], G[1][3], bhi.x, bhi.y, pu[0], pu[1], pu[2], pu[3]);
    if (rl.diag) wp.ppu[tl][g] = make_float4(rl.godd ? pe[1] : pe[0], rl.godd ? po[3] : po[2], pu[0], pu[2]);
    float v[8];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        v[nt * 2 + s] = fmaf(G[nt][s], pd.x, G[nt][2 + s] * pd.z);
        v[4 + nt * 2 + s] = fmaf(hs[tl][nt][s], dy2.x, hs[tl][nt][2 + s] * dy2.y);
      }
    reduce_scatter(v, tl);
  }
}

}  // namespace scan7b
}  // namespace apriel
