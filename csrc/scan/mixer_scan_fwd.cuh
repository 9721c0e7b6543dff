// Fused Apriel-H1 mixer scan, forward: in_proj output (z, x, B, C) + dt_low -> y (b, L, D).
//
// Algorithm: parallel over (sequence, head); inside a block, thread (ch, j) owns channel ch of the head and
// states j*NS .. j*NS+NS-1 (NS = 16 / K) in fp32 registers and runs the recurrence serially over time.
// Per tile of kChunk tokens: (1) stage x (with conv halo), B, C, z, dt_low in smem (prefetched into
// registers during the previous tile); (2) prep: u = silu(conv(x) + b), delta = softplus(W_dt dt_low + 2 b_dt)
// per (channel, token); (3) scan: dA = ex2(delta * A * log2 e), h = dA h + delta u B, y = C.h summed over the
// K lanes of a channel with xor shuffles, + D u, * silu(z); (4) coalesced store of y.
// Bound: one ex2 per (channel, state, token) on the MUFU unit (16/clk/SM); see docs/notes/scan.md.
// The state before each tile is stored as a checkpoint for the backward when p.ckpt != nullptr.
#pragma once
#include "../common/cuda_check.h"
#include "scan_common.cuh"
#include "scan_tile.cuh"

namespace apriel {
namespace scan {

template <typename T, int K>
struct FwdSmem {
  Tile tile;
  alignas(16) float dtw[kN][kMaxR + 4];
  alignas(16) float2 ud[kChunk][kN];  // (delta, u) per (token, channel): one 8-byte load in the scan
  alignas(16) float y[kChunk][kN];
};

// One tile of the recurrence for this thread's NS states; acc[t] = its share of C_t . h_t.
// A document start (seq change) zeroes the decay of that token: h = 0 * h + delta u B.
template <int K, bool kSeq, bool kFull>
__device__ __forceinline__ void scan_tile(const Tile& S, const float2 (*ud)[kN], const float (&A2)[kN / K],
                                          float (&h)[kN / K], float (&acc)[kChunk], int sch, int j, int Tv) {
  constexpr int NS = kN / K;
#pragma unroll
  for (int t = 0; t < kChunk; ++t) {
    acc[t] = 0.f;
    if (kFull || t < Tv) {  // kFull: no branch at all, so the unrolled tokens interleave
      const float2 dlu = ud[t][sch];
      const float du = dlu.x * dlu.y;
      float Bv[NS], Cv[NS];
      load_states<NS>(&S.B[t][j * NS], Bv);
      load_states<NS>(&S.C[t][j * NS], Cv);
      const float keep = (!kSeq || S.seq[t + kHalo] == S.seq[t + kHalo - 1]) ? 1.f : 0.f;
      float a = 0.f;
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        float dA = ex2(dlu.x * A2[s]);
        if (kSeq) dA *= keep;
        h[s] = fmaf(dA, h[s], du * Bv[s]);
        a = fmaf(Cv[s], h[s], a);
      }
      acc[t] = a;
    }
  }
}

// kMinBlocks: resident blocks per SM the register budget is sized for (launch bounds).
template <typename T, int K, int kMinBlocks>
__global__ void __launch_bounds__(kN * K, kMinBlocks) mixer_scan_fwd_kernel(MixerScanParams p) {
  constexpr int NT = kN * K, NS = kN / K;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  FwdSmem<T, K>& sm = *reinterpret_cast<FwdSmem<T, K>*>(smem_raw);
  Tile& S = sm.tile;
  const int head = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int group = head / p.heads_per_group;
  const int c0 = head * kN;
  const int D = p.d_inner, L = p.seqlen, R = p.dt_rank;

  // prep mapping: channel pch, tokens tid/16 + k*(NT/16)
  const int pch = tid % kN;
  const PrepConsts pk = prep_consts(p, c0 + pch, group, pch);
  // W_dt rows of the head, zero-padded to kMaxR (the unrolled dot product reads whole float4s)
  for (int i = tid; i < kN * kMaxR; i += NT) {
    const int ch = i / kMaxR, col = i % kMaxR;
    sm.dtw[ch][col] = col < R ? p.dt_w[(int64_t)(c0 + ch) * R + col] : 0.f;
  }

  // scan mapping: channel sch, states j*NS..
  const int sch = tid / K, j = tid % K;
  const int cs = c0 + sch;
  float A2[NS], h[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const int n = j * NS + s;
    A2[s] = -__expf(p.A_log[cs * kN + n]) * kLog2e;
    h[s] = p.init_ssm != nullptr ? p.init_ssm[((int64_t)b * D + cs) * kN + n] : 0.f;
  }
  const float Dc = p.Dskip[cs];
  const bool has_seq = p.seq_idx != nullptr;

  TileRegs<T, NT, false> regs;
  regs.load(p, b, head, group, 0);
  const int n_tiles = p.n_chunks;
  T* y = reinterpret_cast<T*>(p.y) + (int64_t)b * L * D;
  int Tv = 0;
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int t0 = tile * kChunk;
    Tv = min(kChunk, L - t0);
    __syncthreads();  // previous tile's readers are done
    regs.store(p, S, b, group, t0);
    __syncthreads();
    if (tile + 1 < n_tiles) regs.load(p, b, head, group, t0 + kChunk);

#pragma unroll
    for (int k = 0; k < kN * kChunk / NT; ++k) {
      const int t = tid / kN + k * (NT / kN);
      if (t < Tv) {
        const float cv = conv_pre(S, pk, pch, t);
        sm.ud[t][pch] = make_float2(softplus_fast(dt_pre2(S, sm.dtw, pk, pch, t, R)), cv * sigmoid_fast(cv));
      }
    }
    if (p.ckpt != nullptr) {
#pragma unroll
      for (int s = 0; s < NS; ++s)
        p.ckpt[(((int64_t)b * n_tiles + tile) * D + cs) * kN + j * NS + s] = h[s];
    }
    __syncthreads();

    // Scan: the time loop is fully unrolled and branch-free so the exp2s of later tokens overlap the
    // h chain; the per-token readouts stay in registers and are reduced over the K lanes afterwards.
    float acc[kChunk];
    if (Tv == kChunk) {
      if (has_seq) scan_tile<K, true, true>(S, sm.ud, A2, h, acc, sch, j, Tv);
      else scan_tile<K, false, true>(S, sm.ud, A2, h, acc, sch, j, Tv);
    } else {
      if (has_seq) scan_tile<K, true, false>(S, sm.ud, A2, h, acc, sch, j, Tv);
      else scan_tile<K, false, false>(S, sm.ud, A2, h, acc, sch, j, Tv);
    }
    int base;
    reduce_scatter<K>(acc, j, base);
#pragma unroll
    for (int i = 0; i < kChunk / K; ++i) {
      const int t = base + i;
      if (t < Tv) {
        const float zz = S.z[t][sch];
        sm.y[t][sch] = (acc[i] + Dc * sm.ud[t][sch].y) * zz * sigmoid_fast(zz);
      }
    }
    __syncthreads();
    for (int i = tid; i < kN * Tv; i += NT)
      y[(int64_t)(t0 + i / kN) * D + c0 + i % kN] = from_f<T>(sm.y[i / kN][i % kN]);
  }

#pragma unroll
  for (int s = 0; s < NS; ++s) p.final_ssm[((int64_t)b * D + cs) * kN + j * NS + s] = h[s];
  // Final conv state: the last width-1 x inputs (of the last document), written once per group.
  const int hw = p.width - 1;
  if (head % p.heads_per_group == 0 && tid < kN * hw) {
    const int ch = tid / hw, k = tid % hw;
    const int row = Tv + kHalo - hw + k;
    const float v = S.seq[row] == S.seq[Tv + kHalo - 1] ? S.x[row][ch] : 0.f;
    reinterpret_cast<T*>(p.final_conv)[((int64_t)b * p.d_xb + group * kN + ch) * hw + k] = from_f<T>(v);
  }
}

template <typename T, int K, int kMinBlocks>
void launch_mixer_scan_fwd(const MixerScanParams& p, void* stream) {
  const size_t smem = sizeof(FwdSmem<T, K>);
  auto kernel = mixer_scan_fwd_kernel<T, K, kMinBlocks>;
  if (smem > 48 * 1024)
    APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  dim3 grid(p.d_inner / kN, p.batch);
  kernel<<<grid, kN * K, smem, static_cast<cudaStream_t>(stream)>>>(p);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace scan

// K = 8: 3 blocks of 128 threads per SM (168 registers); K = 16: 2 blocks of 256 (128 registers);
// K = 17 selects K = 16 sized for 3 blocks per SM (80 registers, a few spills) for occupancy experiments.
template <typename T, int K>
void launch_mixer_scan_fwd(const MixerScanParams& p, void* stream) {
  if constexpr (K == 17) scan::launch_mixer_scan_fwd<T, 16, 3>(p, stream);
  else scan::launch_mixer_scan_fwd<T, K, K == 16 ? 2 : 3>(p, stream);
}

}  // namespace apriel
