// Backward of the generic selective scan. Same grid / block mapping as the forward. Tiles in reverse order:
// stage the tile (+ dy, gy = dy * silu(z)), then per pass (one state per lane) recompute the tile's states
// from the forward's checkpoint into registers hs[kT], run the adjoint recurrence
//   G_t = C_t gy_t + a_{t+1} G_{t+1}      (a_t = keep_t exp(delta_t A), recomputed: second ex2)
// and collect per token: d delta partials sum_n G (u B + a A h_{t-1}), du partials sum_n G B (reduce-
// scattered over the 16 lanes after the tile), dB = G delta u and dC = gy h per (token, channel, state) in
// smem, summed over the block's channels of each group in a fixed order and written as per-block partials
// (the host sums blocks with torch: deterministic, no atomics). dA, dD, d delta_bias accumulate per thread.
#pragma once
#include "sscan_fwd.cuh"

namespace apriel {
namespace sscan {

// Reverse sweep of one tile for one state. hs: the tile's states (recomputed), h0: the state before it.
template <bool kSeq>
__device__ __forceinline__ void bwd_tile(float& carry, float& dA_acc, float (&accA)[kT], float (&accB)[kT],
                                         const float (&hs)[kT], float h0, float A, float A2, const float* s_dt,
                                         const float* s_dtu, const float* s_u, const float* s_gy, const float* Bp,
                                         int bw, const float* Cp, int cw, const float* s_keep, float* s_rB,
                                         float* s_rC, int ci, int tid) {
#pragma unroll
  for (int t = kT - 1; t >= 0; --t) {
    const float dt = s_dt[t * kRow + ci];
    float a = ex2(dt * A2);
    if (kSeq) a *= s_keep[t];
    const float gy = s_gy[t * kRow + ci];
    const float G = fmaf(Cp[t * cw], gy, carry);
    const float hp = t > 0 ? hs[t > 0 ? t - 1 : 0] : h0;
    const float GB = G * Bp[t * bw];
    const float q = G * a * hp;
    accB[t] = GB;
    accA[t] = fmaf(GB, s_u[t * kRow + ci], q * A);
    dA_acc = fmaf(q, dt, dA_acc);
    s_rB[t * kThreads + tid] = G * s_dtu[t * kRow + ci];
    s_rC[t * kThreads + tid] = gy * hs[t];
    carry = a * G;
  }
}

// The interleaved versions (one B and one C group per block, N <= 16): dd = (delta, delta u), ug = (u, gy) of
// the channel, bc = (B, C) of the state, float2 rows of kRow. Same arithmetic as the plain loops.
template <bool kSeq>
__device__ __forceinline__ void recompute_tile_bc(float h0, float (&hs)[kT], float (&accA)[kT], float A2,
                                                  const float2* dd, const float2* bc, const float* s_keep) {
  float h = h0;
#pragma unroll
  for (int t = 0; t < kT; ++t) {
    const float2 d = dd[t * kRow], w = bc[t * kRow];
    float a = ex2(d.x * A2);
    if (kSeq) a *= s_keep[t];
    h = fmaf(a, h, d.y * w.x);
    hs[t] = h;
    accA[t] = w.y * h;
  }
}

template <bool kSeq>
__device__ __forceinline__ void bwd_tile_bc(float& carry, float& dA_acc, float (&accA)[kT], float (&accB)[kT],
                                            const float (&hs)[kT], float h0, float A, float A2, const float2* dd,
                                            const float2* ug, const float2* bc, const float* s_keep, float* s_rB,
                                            float* s_rC, int tid) {
#pragma unroll
  for (int t = kT - 1; t >= 0; --t) {
    const float2 d = dd[t * kRow], w = bc[t * kRow], x = ug[t * kRow];
    float a = ex2(d.x * A2);
    if (kSeq) a *= s_keep[t];
    const float G = fmaf(w.y, x.y, carry);
    const float hp = t > 0 ? hs[t > 0 ? t - 1 : 0] : h0;
    const float GB = G * w.x;
    const float q = G * a * hp;
    accB[t] = GB;
    accA[t] = fmaf(GB, x.x, q * A);
    dA_acc = fmaf(q, d.x, dA_acc);
    s_rB[t * kThreads + tid] = G * d.y;
    s_rC[t * kThreads + tid] = x.y * hs[t];
    carry = a * G;
  }
}

// Sum the (token, channel, state) contributions of one pass over the block's channels of each group and
// write the per-block partial part[b, t0 + t, blk, lg, n] (n = lane + 16 s < N, t < nt).
__device__ __forceinline__ void write_group_partials(const SScanParams& p, const Geo& g, const float* s_r,
                                                     float* part, int ngl, int cpg, int g0, int t0, int nt, int s) {
  const int nblk = gridDim.x, N = p.dstate;
  for (int idx = g.tid; idx < kT * ngl * kSsLanes; idx += kThreads) {
    const int lx = idx % kSsLanes, rest = idx / kSsLanes, lg = rest % ngl, t = rest / ngl;
    const int n = lx + s * kSsLanes;
    if (t >= nt || n >= N) continue;
    const int grp = g0 + lg;
    const int lo = max(0, grp * cpg - g.c0);
    const int hi = min(min(kSsChannels, (grp + 1) * cpg - g.c0), p.dim - g.c0);
    float sum = 0.f;
    for (int ci = lo; ci < hi; ++ci) sum += s_r[t * kThreads + ci * kSsLanes + lx];
    part[((((int64_t)g.b * p.seqlen + t0 + t) * nblk + g.blk) * ngl + lg) * N + n] = sum;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sscan_bwd_kernel(SScanParams p) {
  extern __shared__ float smem[];
  const Geo g(p);
  const int N = p.dstate, NP = p.n_pass * kSsLanes, D = p.dim;
  const int bw = sscan_bc_row(p.b_ngl, p.n_pass), cw = sscan_bc_row(p.c_ngl, p.n_pass);
  float* s_u = smem;
  float* s_dt = s_u + kT * kRow;
  float* s_dtu = s_dt + kT * kRow;
  float* s_v = s_dtu + kT * kRow;
  float* s_z = s_v + kT * kRow;
  float* s_dy = s_z + kT * kRow;
  float* s_gy = s_dy + kT * kRow;
  float* s_o1 = s_gy + kT * kRow;
  float* s_o2 = s_o1 + kT * kRow;
  float* s_o3 = s_o2 + kT * kRow;
  float2* s_dd = reinterpret_cast<float2*>(s_o3 + kT * kRow);  // (kT, kRow) (delta, delta u); even offset
  float2* s_ug = s_dd + kT * kRow;                              // (kT, kRow) (u, gy)
  float* s_B = reinterpret_cast<float*>(s_ug + kT * kRow);
  float* s_C = s_B + kT * bw;
  float* s_keep = s_C + kT * cw;
  float* s_g = s_keep + kT;                    // (n_pass, kThreads): adjoint carried to the previous tile
  float* s_dA = s_g + p.n_pass * kThreads;     // (n_pass, kThreads): dA accumulators
  float* s_rB = s_dA + p.n_pass * kThreads;    // (kT, kThreads): dB contributions of one pass
  float* s_rC = s_rB + kT * kThreads;          // (kT, kThreads): dC contributions

  const float Dsk = (g.cvalid && p.Dskip != nullptr) ? p.Dskip[g.c] : 0.f;
  const bool fast = p.interleave_bwd && p.b_ngl == 1 && p.c_ngl == 1 && p.n_pass == 1;
  for (int s = 0; s < p.n_pass; ++s) {
    const int n = g.lane + s * kSsLanes;
    s_g[s * kThreads + g.tid] =
        (g.cvalid && n < N && p.dfinal != nullptr) ? p.dfinal[((int64_t)g.b * D + g.c) * N + n] : 0.f;
    s_dA[s * kThreads + g.tid] = 0.f;
  }
  float dD_acc = 0.f, ddb_acc = 0.f;
  const T* dy = static_cast<const T*>(p.dy) + (int64_t)g.b * p.seqlen * D;
  for (int k = p.n_chunks - 1; k >= 0; --k) {
    const int t0 = k * kT, nt = min(kT, p.seqlen - t0);
    stage_channels(s_dy, dy, D, false, t0, nt, g.tid,
                   [&](int ci) { return g.c0 + ci < D ? (int64_t)(g.c0 + ci) : (int64_t)-1; });
    stage_tile<T>(p, g, t0, nt, s_u, s_dt, s_dtu, s_v, s_z, s_B, s_C, s_keep, fast,
                  fast ? s_dd : nullptr);  // syncs (s_dy visible)
    for (int idx = g.tid; idx < kT * kSsChannels; idx += kThreads) {
      const int k2 = (idx / kSsChannels) * kRow + idx % kSsChannels;
      float gy = s_dy[k2];
      if (p.z != nullptr) gy *= s_z[k2] * sigmoidf_(s_z[k2]);
      s_gy[k2] = gy;
      if (fast) s_ug[k2] = make_float2(s_u[k2], gy);
    }
    __syncthreads();
    float ty0 = 0.f, ty1 = 0.f, tdt0 = 0.f, tdt1 = 0.f, tdu0 = 0.f, tdu1 = 0.f;
    for (int s = 0; s < p.n_pass; ++s) {
      const int n = g.lane + s * kSsLanes;
      const bool nvalid = g.cvalid && n < N;
      const float A = nvalid ? p.A[(int64_t)g.c * N + n] : 0.f;
      const float A2 = A * kLog2e;
      const float h0 = nvalid ? p.ckpt_in[(((int64_t)g.b * p.n_chunks + k) * D + g.c) * N + n] : 0.f;
      const float* Bp = s_B + g.lgb * NP + n;
      const float* Cp = s_C + g.lgc * NP + n;
      float hs[kT], accA[kT], accB[kT];
      if (fast) {
        const float2* bc = reinterpret_cast<const float2*>(s_B) + n;
        if (p.seq_idx != nullptr) recompute_tile_bc<true>(h0, hs, accA, A2, s_dd + g.ci, bc, s_keep);
        else recompute_tile_bc<false>(h0, hs, accA, A2, s_dd + g.ci, bc, s_keep);
      } else {  // recompute the tile's states from the checkpoint (and the readout C h, for dz)
        float h = h0;
#pragma unroll
        for (int t = 0; t < kT; ++t) {
          float a = ex2(s_dt[t * kRow + g.ci] * A2);
          if (p.seq_idx != nullptr) a *= s_keep[t];
          h = fmaf(a, h, s_dtu[t * kRow + g.ci] * Bp[t * bw]);
          hs[t] = h;
          accA[t] = Cp[t * cw] * h;
        }
      }
      reduce_scatter(accA, g.lane);
      ty0 += accA[0];
      ty1 += accA[1];
      float carry = s_g[s * kThreads + g.tid], dA_acc = s_dA[s * kThreads + g.tid];
      if (fast) {
        const float2* bc = reinterpret_cast<const float2*>(s_B) + n;
        if (p.seq_idx != nullptr)
          bwd_tile_bc<true>(carry, dA_acc, accA, accB, hs, h0, A, A2, s_dd + g.ci, s_ug + g.ci, bc, s_keep, s_rB, s_rC, g.tid);
        else
          bwd_tile_bc<false>(carry, dA_acc, accA, accB, hs, h0, A, A2, s_dd + g.ci, s_ug + g.ci, bc, s_keep, s_rB, s_rC, g.tid);
      } else if (p.seq_idx != nullptr)
        bwd_tile<true>(carry, dA_acc, accA, accB, hs, h0, A, A2, s_dt, s_dtu, s_u, s_gy, Bp, bw, Cp, cw, s_keep,
                       s_rB, s_rC, g.ci, g.tid);
      else
        bwd_tile<false>(carry, dA_acc, accA, accB, hs, h0, A, A2, s_dt, s_dtu, s_u, s_gy, Bp, bw, Cp, cw, s_keep,
                        s_rB, s_rC, g.ci, g.tid);
      s_g[s * kThreads + g.tid] = carry;
      s_dA[s * kThreads + g.tid] = dA_acc;
      reduce_scatter(accA, g.lane);
      reduce_scatter(accB, g.lane);
      tdt0 += accA[0];
      tdt1 += accA[1];
      tdu0 += accB[0];
      tdu1 += accB[1];
      __syncthreads();
      write_group_partials(p, g, s_rB, p.dB_part, p.b_ngl, p.b_cpg, g.gb0, t0, nt, s);
      write_group_partials(p, g, s_rC, p.dC_part, p.c_ngl, p.c_cpg, g.gc0, t0, nt, s);
      __syncthreads();
    }
    // Per (channel, token) epilogue: lane owns tokens 2 lane, 2 lane + 1 of its channel.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int t = 2 * g.lane + i, k2 = t * kRow + g.ci;
      const float uu = s_u[k2], dt = s_dt[k2], v = s_v[k2], gy = s_gy[k2];
      const float du = fmaf(dt, i == 0 ? tdu0 : tdu1, Dsk * gy);
      float dd = i == 0 ? tdt0 : tdt1;
      if (p.softplus && v <= 20.f) dd *= sigmoidf_(v);
      if (t < nt && g.cvalid) {
        dD_acc = fmaf(gy, uu, dD_acc);
        ddb_acc += dd;
      }
      s_o1[k2] = du;
      s_o2[k2] = dd;
      if (p.z != nullptr) {
        const float zz = s_z[k2], sg = sigmoidf_(zz);
        const float y = fmaf(Dsk, uu, i == 0 ? ty0 : ty1);
        s_o3[k2] = s_dy[k2] * y * sg * (1.f + zz * (1.f - sg));
      }
    }
    __syncthreads();
    const int64_t row0 = (int64_t)g.b * p.seqlen;
    for (int idx = g.tid; idx < kT * kSsChannels; idx += kThreads) {
      const int ci = idx % kSsChannels, t = idx / kSsChannels, c = g.c0 + ci, k2 = t * kRow + ci;
      if (t >= nt || c >= D) continue;
      const int64_t o = (row0 + t0 + t) * D + c;
      if (p.du_f32) static_cast<float*>(p.du)[o] = s_o1[k2];
      else static_cast<T*>(p.du)[o] = from_f<T>(s_o1[k2]);
      static_cast<T*>(p.ddelta)[o] = from_f<T>(s_o2[k2]);
      if (p.dz != nullptr) static_cast<T*>(p.dz)[o] = from_f<T>(s_o3[k2]);
    }
    __syncthreads();
  }
  for (int s = 0; s < p.n_pass; ++s) {
    const int n = g.lane + s * kSsLanes;
    if (!(g.cvalid && n < N)) continue;
    const int64_t o = ((int64_t)g.b * D + g.c) * N + n;
    p.dA_part[o] = s_dA[s * kThreads + g.tid];
    if (p.dinit != nullptr) p.dinit[o] = s_g[s * kThreads + g.tid];
  }
  dD_acc = lane_sum(dD_acc);
  ddb_acc = lane_sum(ddb_acc);
  if (g.lane == 0 && g.cvalid) {
    p.dD_part[(int64_t)g.b * D + g.c] = dD_acc;
    p.ddb_part[(int64_t)g.b * D + g.c] = ddb_acc;
  }
}

}  // namespace sscan

template <typename T>
void launch_sscan_bwd(const SScanParams& p, void* stream) {
  if (p.bwd_v2) {  // v2 (sscan_bwd2.cuh) or v7 (sscan_bwd7.cuh, 16-bit only) where the host selected it
    if constexpr (sizeof(T) == 2) {
      if (p.bwd_v7) {
        launch_sscan_bwd7<T>(p, stream);
        return;
      }
    }
    launch_sscan_bwd2<T>(p, stream);
    return;
  }
  const dim3 grid((p.dim + kSsChannels - 1) / kSsChannels, p.batch), block(kSsLanes, kSsChannels);
  const int smem = sscan_bwd_smem_bytes(p);
  if (smem > 48 * 1024)  // opt-in above the default limit (once per size is enough, but it is cheap)
    APRIEL_CUDA_CHECK(cudaFuncSetAttribute(sscan::sscan_bwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  sscan::sscan_bwd_kernel<T><<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>(p);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace apriel
