// Fused Apriel-H1 mixer scan, backward. Same block mapping as the forward (one head of one sequence;
// thread (ch, j) owns NS = 16/K states of channel ch). Chunks of kChunk tokens are visited in reverse:
//   1. stage the tile (+ dy) and recompute u, delta per (channel, token);
//   2. recompute the states of the chunk from the forward's checkpoint, kept in registers (hs[t][s]),
//      and the readout C.h (for dz);
//   3. reverse recurrence g_t = dA_{t+1} g_{t+1} + C_t dy_t in registers, producing d delta, du (summed over
//      the K lanes by shuffles), dA_log (per thread), and dB, dC per (token, state) summed over the head's 16
//      channels (shuffles within a warp, then the warps in a fixed order through smem: deterministic);
//   4. per (channel, token): dz, D skip, silu' and softplus' (d of the dt_proj output, to finish with GEMMs
//      on the host), conv weight/bias grads, and d(conv input) through the transposed conv using a 3-token
//      halo of d(conv output) carried from the chunk after.
// No global atomics: cross-head sums (dB and dx over the r heads of a group, parameters over the batch)
// are written as partials and summed on the host in a fixed order.
#pragma once
#include "../common/cuda_check.h"
#include "scan_common.cuh"
#include "scan_tile.cuh"

namespace apriel {
namespace scan {

template <typename T, int K>
struct BwdSmem {
  Tile tile;
  alignas(16) float dtw[kN][kMaxR + 4];
  alignas(16) float u[kChunk][kN], dl[kChunk][kN], cv[kChunk][kN], v[kChunk][kN], dys[kChunk][kN], ysc[kChunk][kN];
  alignas(16) float ddl[kChunk][kN], du[kChunk][kN];
  alignas(16) float dco[kChunk + kHalo][kN];  // d(conv pre-activation); rows kChunk.. = first rows of the chunk after
  alignas(16) int seq_next[kHalo];
  alignas(16) float vB[kChunk][kN][kN], vC[kChunk][kN][kN];  // per (token, channel, state): summed over channels after the loop
  alignas(16) float accs[kN * K / kN][kN][7];                           // final per-channel reductions (fixed order)
};

// Steps 2-3 for one chunk and this thread's NS states: recompute h_t from the checkpoint, then run the
// reverse recurrence. Full unrolling with compile-time register indices (hs[t][s]); no branches when kFull
// so independent work of neighbouring tokens interleaves; per-token reductions are deferred to the end
// (reduce_scatter over the K lanes; smem for the sums over channels).
template <int K, bool kSeq, bool kFull, typename Sm>
__device__ __forceinline__ void bwd_chunk(const Tile& S, Sm& sm, const float (&A2)[kN / K], const float (&An)[kN / K],
                                          const float (&h0)[kN / K], float (&hs)[kChunk][kN / K], float (&g)[kN / K],
                                          float (&dAlog)[kN / K], int sch, int j, int Tv) {
  constexpr int NS = kN / K;
  {
    float h[NS], acc[kChunk];
#pragma unroll
    for (int s = 0; s < NS; ++s) h[s] = h0[s];
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      acc[t] = 0.f;
      if (kFull || t < Tv) {
        const float keep = (!kSeq || S.seq[t + kHalo] == S.seq[t + kHalo - 1]) ? 1.f : 0.f;
        const float dl = sm.dl[t][sch];
        const float du = dl * sm.u[t][sch];
        float Bv[NS], Cv[NS];
        load_states<NS>(&S.B[t][j * NS], Bv);
        load_states<NS>(&S.C[t][j * NS], Cv);
        float a = 0.f;
#pragma unroll
        for (int s = 0; s < NS; ++s) {
          float dA = ex2(dl * A2[s]);
          if (kSeq) dA *= keep;
          h[s] = fmaf(dA, h[s], du * Bv[s]);
          hs[t][s] = h[s];
          a = fmaf(Cv[s], h[s], a);
        }
        acc[t] = a;
      }
    }
    int base;
    reduce_scatter<K>(acc, j, base);
#pragma unroll
    for (int i = 0; i < kChunk / K; ++i)
      if (base + i < Tv) sm.ysc[base + i][sch] = acc[i];
  }
  float pdv[kChunk], puv[kChunk];
#pragma unroll
  for (int t = kChunk - 1; t >= 0; --t) {
    pdv[t] = 0.f;
    puv[t] = 0.f;
    if (kFull || t < Tv) {
      const float keep = (!kSeq || S.seq[t + kHalo] == S.seq[t + kHalo - 1]) ? 1.f : 0.f;
      const float dl = sm.dl[t][sch], uu = sm.u[t][sch], dyc = sm.dys[t][sch];
      float Bv[NS], Cv[NS], vb[NS], vc[NS];
      load_states<NS>(&S.B[t][j * NS], Bv);
      load_states<NS>(&S.C[t][j * NS], Cv);
      float pd = 0.f, pu = 0.f;
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        g[s] = fmaf(Cv[s], dyc, g[s]);  // dL/dh_t
        float dA = ex2(dl * A2[s]);
        if (kSeq) dA *= keep;           // a document start cuts both h_{t-1} -> h_t and the adjoint
        const float hp = t > 0 ? hs[t > 0 ? t - 1 : 0][s] : h0[s];
        const float gA = g[s] * hp * dA * An[s];  // dL/d(delta) through the decay
        pd += fmaf(g[s] * Bv[s], uu, gA);
        pu = fmaf(g[s], Bv[s], pu);
        dAlog[s] = fmaf(gA, dl, dAlog[s]);
        vb[s] = g[s] * dl * uu;
        vc[s] = dyc * hs[t][s];
        g[s] *= dA;
      }
      pdv[t] = pd;
      puv[t] = pu * dl;
      store_states<NS>(&sm.vB[t][sch][j * NS], vb);
      store_states<NS>(&sm.vC[t][sch][j * NS], vc);
    }
  }
  int base;
  reduce_scatter<K>(pdv, j, base);
  reduce_scatter<K>(puv, j, base);
#pragma unroll
  for (int i = 0; i < kChunk / K; ++i) {
    if (base + i < Tv) {
      sm.ddl[base + i][sch] = pdv[i];
      sm.du[base + i][sch] = puv[i];
    }
  }
}

// kMinBlocks: resident blocks per SM the register budget is sized for (launch bounds).
template <typename T, int K, int kMinBlocks>
__global__ void __launch_bounds__(kN * K, kMinBlocks) mixer_scan_bwd_kernel(MixerScanParams p) {
  constexpr int NT = kN * K, NS = kN / K;
  static_assert(NT % 32 == 0, "K >= 2");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  BwdSmem<T, K>& sm = *reinterpret_cast<BwdSmem<T, K>*>(smem_raw);
  Tile& S = sm.tile;
  const int head = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int group = head / p.heads_per_group;
  const int c0 = head * kN;
  const int D = p.d_inner, L = p.seqlen, R = p.dt_rank, hw = p.width - 1;
  const int64_t rowD = D, rowZ = 2 * (int64_t)D + 2 * p.d_xb;

  const int pch = tid % kN, pslot = tid / kN;
  const PrepConsts pk = prep_consts(p, c0 + pch, group, pch);
  // W_dt rows of the head, zero-padded to kMaxR (the unrolled dot product reads whole float4s)
  for (int i = tid; i < kN * kMaxR; i += NT) {
    const int ch = i / kMaxR, col = i % kMaxR;
    sm.dtw[ch][col] = col < R ? p.dt_w[(int64_t)(c0 + ch) * R + col] : 0.f;
  }
  for (int i = tid; i < (kChunk + kHalo) * kN; i += NT) (&sm.dco[0][0])[i] = 0.f;
  const float Dp = p.Dskip[c0 + pch];

  const int sch = tid / K, j = tid % K;
  const int cs = c0 + sch;
  float A2[NS], An[NS], g[NS], dAlog[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const int n = j * NS + s;
    An[s] = -__expf(p.A_log[cs * kN + n]);
    A2[s] = An[s] * kLog2e;
    g[s] = p.dfinal_ssm != nullptr ? p.dfinal_ssm[((int64_t)b * D + cs) * kN + n] : 0.f;
    dAlog[s] = 0.f;
  }
  float accD = 0.f, accCB = 0.f, accW[4] = {0.f, 0.f, 0.f, 0.f};
  const bool has_seq = p.seq_idx != nullptr;

  T* dz_out = reinterpret_cast<T*>(p.dzxbc) + (int64_t)b * L * rowZ;
  TileRegs<T, NT, true> regs;
  const int n_chunks = p.n_chunks;
  regs.load(p, b, head, group, (n_chunks - 1) * kChunk);
  for (int chunk = n_chunks - 1; chunk >= 0; --chunk) {
    const int t0 = chunk * kChunk;
    const int Tv = min(kChunk, L - t0);
    __syncthreads();
    // Halo of the chunk after (already processed): its first 3 rows of d(conv out) and their documents.
    if (chunk + 1 < n_chunks) {
      if (tid < kHalo * kN) sm.dco[kChunk + tid / kN][tid % kN] = sm.dco[tid / kN][tid % kN];
      if (tid < kHalo) sm.seq_next[tid] = S.seq[kHalo + tid];
    }
    __syncthreads();
    regs.store(p, S, b, group, t0);
    __syncthreads();
    if (chunk > 0) regs.load(p, b, head, group, t0 - kChunk);

    // 1. prep
#pragma unroll
    for (int k = 0; k < kN * kChunk / NT; ++k) {
      const int t = pslot + k * (NT / kN);
      if (t < Tv) {
        const float cvv = conv_pre(S, pk, pch, t);
        const float vv = dt_pre2(S, sm.dtw, pk, pch, t, R);
        const float zz = S.z[t][pch];
        sm.cv[t][pch] = cvv;
        sm.u[t][pch] = cvv * sigmoid_fast(cvv);
        sm.v[t][pch] = vv;
        sm.dl[t][pch] = softplus_fast(vv);
        sm.dys[t][pch] = S.dy[t][pch] * zz * sigmoid_fast(zz);
      }
    }
    __syncthreads();

    // 2. recompute the chunk's states from the checkpoint (kept in registers: hs[t][s])
    float h0[NS], hs[kChunk][NS];
#pragma unroll
    for (int s = 0; s < NS; ++s) h0[s] = p.ckpt_in[(((int64_t)b * n_chunks + chunk) * D + cs) * kN + j * NS + s];
    if (Tv == kChunk) {
      if (has_seq) bwd_chunk<K, true, true>(S, sm, A2, An, h0, hs, g, dAlog, sch, j, Tv);
      else bwd_chunk<K, false, true>(S, sm, A2, An, h0, hs, g, dAlog, sch, j, Tv);
    } else {
      if (has_seq) bwd_chunk<K, true, false>(S, sm, A2, An, h0, hs, g, dAlog, sch, j, Tv);
      else bwd_chunk<K, false, false>(S, sm, A2, An, h0, hs, g, dAlog, sch, j, Tv);
    }
    __syncthreads();

    // 4a. per (channel, token) gradients
    T* drow = dz_out + (int64_t)t0 * rowZ;
#pragma unroll
    for (int k = 0; k < kN * kChunk / NT; ++k) {
      const int t = pslot + k * (NT / kN);
      if (t < Tv) {
        const float uu = sm.u[t][pch], zz = S.z[t][pch], sz = sigmoid_fast(zz);
        const float yfull = sm.ysc[t][pch] + Dp * uu;
        drow[t * rowZ + c0 + pch] = from_f<T>(S.dy[t][pch] * yfull * sz * (1.f + zz * (1.f - sz)));
        const float dys = sm.dys[t][pch];
        const float dut = sm.du[t][pch] + dys * Dp;
        accD = fmaf(dys, uu, accD);
        const float cvv = sm.cv[t][pch], sc = sigmoid_fast(cvv);
        const float dco = dut * sc * (1.f + cvv * (1.f - sc));
        sm.dco[t][pch] = dco;
        accCB += dco;
        const int cur = S.seq[t + kHalo];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = t + i;
          if (S.seq[row] == cur) accW[i] = fmaf(dco, S.x[row][pch], accW[i]);
        }
        const float vv = sm.v[t][pch];
        p.ddt_pre[((int64_t)b * L + t0 + t) * rowD + c0 + pch] = sm.ddl[t][pch] * (vv > 20.f ? 1.f : sigmoid_fast(vv));
      }
    }
    // 4b. dB (partial per head), dC (complete per head): sums over the head's 16 channels, fixed order
    for (int i = tid; i < kN * Tv; i += NT) {
      const int t = i / kN, n = i % kN;
      float sb = 0.f, sc = 0.f;
#pragma unroll
      for (int ch = 0; ch < kN; ++ch) {
        sb += sm.vB[t][ch][n];
        sc += sm.vC[t][ch][n];
      }
      p.dB_part[(((int64_t)b * L + t0 + t) * (D / kN) + head) * kN + n] = sb;
      drow[t * rowZ + D + 2 * p.d_xb + c0 + n] = from_f<T>(sc);
    }
    __syncthreads();
    // 4c. d(conv input) = transposed conv of d(conv pre-activation), taps into other documents masked.
#pragma unroll
    for (int k = 0; k < kN * kChunk / NT; ++k) {
      const int t = pslot + k * (NT / kN);
      if (t < Tv) {
        const int cur = S.seq[t + kHalo];
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = t + 3 - i;  // output token using this input at tap i
          if (row < kChunk) {
            if (row < Tv && S.seq[row + kHalo] == cur) acc = fmaf(pk.w[i], sm.dco[row][pch], acc);
          } else if (chunk + 1 < n_chunks && sm.seq_next[row - kChunk] == cur) {
            acc = fmaf(pk.w[i], sm.dco[row][pch], acc);
          }
        }
        p.dx_part[((int64_t)b * L + t0 + t) * rowD + c0 + pch] = acc;
      }
    }
    if (chunk == 0 && tid < kN * hw) {
      // gradient of the initial conv state: positions -hw..-1 (document of token 0)
      const int ch = tid / hw, kk = tid % hw, pos = kk - hw;
      const PrepConsts k2 = prep_consts(p, c0 + ch, group, ch);
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = pos + 3 - i;
        if (row >= 0 && row < Tv && S.seq[row + kHalo] == S.seq[kHalo - 1]) acc = fmaf(k2.w[i], sm.dco[row][ch], acc);
      }
      p.dinit_conv_part[((int64_t)b * D + c0 + ch) * hw + kk] = acc;
    }
  }

  // Outputs of the whole sequence.
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const int64_t o = ((int64_t)b * D + cs) * kN + j * NS + s;
    p.dA_log_part[o] = dAlog[s];
    p.dinit_ssm[o] = g[s];
  }
  __syncthreads();
  sm.accs[pslot][pch][0] = accD;
  sm.accs[pslot][pch][1] = accCB;
#pragma unroll
  for (int i = 0; i < 4; ++i) sm.accs[pslot][pch][2 + i] = accW[i];
  __syncthreads();
  if (tid < kN * 6) {
    const int ch = tid % kN, what = tid / kN;
    float acc = 0.f;
    for (int sl = 0; sl < NT / kN; ++sl) acc += sm.accs[sl][ch][what];
    const int64_t c = (int64_t)b * D + c0 + ch;
    if (what == 0) p.dD_part[c] = acc;
    else if (what == 1) p.dconv_b_part[c] = acc;
    else {
      const int src = what - 2 - (4 - p.width);  // right-aligned taps back to weight columns
      if (src >= 0) p.dconv_w_part[c * p.width + src] = acc;
    }
  }
}

template <typename T, int K, int kMinBlocks>
void launch_mixer_scan_bwd(const MixerScanParams& p, void* stream) {
  const size_t smem = sizeof(BwdSmem<T, K>);
  auto kernel = mixer_scan_bwd_kernel<T, K, kMinBlocks>;
  if (smem > 48 * 1024)
    APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  dim3 grid(p.d_inner / kN, p.batch);
  kernel<<<grid, kN * K, smem, static_cast<cudaStream_t>(stream)>>>(p);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace scan

// K = 8 / 16: one block per SM's register budget (255 registers); K = 17 selects K = 16 sized for
// 2 blocks per SM (128 registers, spills) for occupancy experiments.
template <typename T, int K>
void launch_mixer_scan_bwd(const MixerScanParams& p, void* stream) {
  if constexpr (K == 17) scan::launch_mixer_scan_bwd<T, 16, 2>(p, stream);
  else scan::launch_mixer_scan_bwd<T, K, 1>(p, stream);
}

}  // namespace apriel
