// Forward of the generic selective scan. Grid (ceil(D / 16), batch), block (16 lanes, 16 channels).
// Thread (lane, ci) owns channel c0 + ci and states lane, lane + 16, ... (one per pass; N <= 16: one pass).
// Per tile of kT tokens: stage u, delta (-> softplus(delta + bias), delta * u), z, B, C, the document-start
// flags into smem (fp32), then per pass run the kT-token recurrence in registers (ex2, no branches), keep
// the readout partials C h in registers, reduce-scatter them over the 16 lanes, and let each lane gate and
// store 2 tokens (through smem for a coalesced store).
#pragma once
#include "sscan_common.cuh"

namespace apriel {
namespace sscan {

// Stage one tile of the forward inputs (shared with the backward): s_u, s_dt (post bias/softplus), s_dtu,
// s_z (when z), s_B, s_C, s_keep. Ends with __syncthreads.
// interleave_bc: B and C go to one float2 (B, C) array at s_B (row 2 * 17 floats; one group each, N <= 16)
// and (delta, delta u) also to the float2 array s_dd: the forward's fast tile loop then issues two 64-bit
// shared loads per element instead of four 32-bit ones (shared-load issue, not MUFU, bounds that loop).
template <typename T>
__device__ __forceinline__ void stage_tile(const SScanParams& p, const Geo& g, int t0, int nt, float* s_u,
                                           float* s_dt, float* s_dtu, float* s_v, float* s_z, float* s_B,
                                           float* s_C, float* s_keep, bool interleave_bc = false,
                                           float2* s_dd = nullptr) {
  const int N = p.dstate, NP = p.n_pass * kSsLanes;
  const T* u = static_cast<const T*>(p.u) + (int64_t)g.b * p.u_sb;
  const T* dl = static_cast<const T*>(p.dl) + (int64_t)g.b * p.dl_sb;
  stage_channels(s_u, u, p.u_sl, p.u_sl == 1 && p.u_sc != 1, t0, nt, g.tid,
                 [&](int ci) { return u_col(p, g.c0 + ci); });
  stage_channels(s_dt, dl, p.dl_sl, p.dl_sl == 1 && p.dl_sc != 1, t0, nt, g.tid,
                 [&](int ci) { return g.c0 + ci < p.dim ? (int64_t)(g.c0 + ci) * p.dl_sc : (int64_t)-1; });
  if (p.z != nullptr) {
    const T* z = static_cast<const T*>(p.z) + (int64_t)g.b * p.z_sb;
    stage_channels(s_z, z, p.z_sl, p.z_sl == 1 && p.z_sc != 1, t0, nt, g.tid,
                   [&](int ci) { return g.c0 + ci < p.dim ? (int64_t)(g.c0 + ci) * p.z_sc : (int64_t)-1; });
  }
  const T* Bb = static_cast<const T*>(p.B) + (int64_t)g.b * p.B_sb;
  const T* Cb = static_cast<const T*>(p.C) + (int64_t)g.b * p.C_sb;
  if (interleave_bc) {
    stage_groups(s_B, 2 * kSsRow, Bb, p.B_sl, p.B_sg, p.B_sn, t0, nt, g.gb0, 1, p.b_groups, N, NP, g.tid, 2);
    stage_groups(s_B + 1, 2 * kSsRow, Cb, p.C_sl, p.C_sg, p.C_sn, t0, nt, g.gc0, 1, p.c_groups, N, NP, g.tid, 2);
  } else {
    stage_groups(s_B, sscan_bc_row(p.b_ngl, p.n_pass), Bb, p.B_sl, p.B_sg, p.B_sn, t0, nt, g.gb0, p.b_ngl,
                 p.b_groups, N, NP, g.tid);
    stage_groups(s_C, sscan_bc_row(p.c_ngl, p.n_pass), Cb, p.C_sl, p.C_sg, p.C_sn, t0, nt, g.gc0, p.c_ngl,
                 p.c_groups, N, NP, g.tid);
  }
  stage_keep(s_keep, p.seq_idx != nullptr ? p.seq_idx + (int64_t)g.b * p.seqlen : nullptr, t0, nt, g.tid);
  __syncthreads();
  // delta -> softplus(delta + bias) (v > 20: identity, like every peer); pads keep delta = 0 so the state
  // passes through unchanged (exp(0) = 1, input 0).
  for (int idx = g.tid; idx < kT * kSsChannels; idx += kThreads) {
    const int ci = idx % kSsChannels, t = idx / kSsChannels, c = g.c0 + ci, k = t * kRow + ci;
    float v = 0.f, dt = 0.f;
    if (t < nt && c < p.dim) {
      v = s_dt[k] + (p.delta_bias != nullptr ? p.delta_bias[c] : 0.f);
      dt = p.softplus ? (v > 20.f ? v : log1pf(expf(v))) : v;
    }
    s_dt[k] = dt;
    s_dtu[k] = dt * s_u[k];
    if (s_v != nullptr) s_v[k] = v;
    if (s_dd != nullptr) s_dd[k] = make_float2(dt, dt * s_u[k]);
  }
  __syncthreads();
}

// kT tokens of the recurrence for one state: h <- a h + (delta u) B, acc[t] = C h.
// kBC > 0: the B / C row stride is that constant (one group per block, N <= 16: immediate smem offsets).
template <bool kSeq, int kBC = 0>
__device__ __forceinline__ void fwd_tile(float& h, float (&acc)[kT], float A2, const float* s_dt, const float* s_dtu,
                                         const float* Bp, int bw_rt, const float* Cp, int cw_rt,
                                         const float* s_keep, int ci) {
  const int bw = kBC > 0 ? kBC : bw_rt, cw = kBC > 0 ? kBC : cw_rt;
#pragma unroll
  for (int t = 0; t < kT; ++t) {
    float a = ex2(s_dt[t * kRow + ci] * A2);
    if (kSeq) a *= s_keep[t];
    h = fmaf(a, h, s_dtu[t * kRow + ci] * Bp[t * bw]);
    acc[t] = Cp[t * cw] * h;
  }
}

// The same recurrence on the interleaved arrays: dd[t] = (delta, delta u) of the channel, bc[t] = (B, C) of
// the state (float2 rows of kSsRow).
template <bool kSeq>
__device__ __forceinline__ void fwd_tile_bc(float& h, float (&acc)[kT], float A2, const float2* dd, const float2* bc,
                                            const float* s_keep) {
#pragma unroll
  for (int t = 0; t < kT; ++t) {
    const float2 d = dd[t * kRow], w = bc[t * kRow];
    float a = ex2(d.x * A2);
    if (kSeq) a *= s_keep[t];
    h = fmaf(a, h, d.y * w.x);
    acc[t] = w.y * h;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) sscan_fwd_kernel(SScanParams p) {
  extern __shared__ float smem[];
  const Geo g(p);
  const int N = p.dstate, NP = p.n_pass * kSsLanes, D = p.dim;
  const int bw = sscan_bc_row(p.b_ngl, p.n_pass), cw = sscan_bc_row(p.c_ngl, p.n_pass);
  float* s_u = smem;
  float* s_dt = s_u + kT * kRow;
  float* s_dtu = s_dt + kT * kRow;
  float* s_z = s_dtu + kT * kRow;
  float* s_y = s_z + kT * kRow;
  float2* s_dd = reinterpret_cast<float2*>(s_y + kT * kRow);  // (kT, kRow) float2; offset 5 kT kRow: even
  float* s_B = s_y + 3 * kT * kRow;
  float* s_C = s_B + kT * bw;
  float* s_keep = s_C + kT * cw;
  float* s_h = s_keep + kT;  // (n_pass, kThreads): each thread's states between tiles

  const float Dsk = (g.cvalid && p.Dskip != nullptr) ? p.Dskip[g.c] : 0.f;
  // One B and one C group per block, N <= 16 (mamba's and the Apriel mixer's shapes): interleaved arrays.
  // The B / C region (kT (bw + cw) = kT 2 kRow floats) holds the float2 (B, C) array exactly.
  const bool fast = p.interleave && p.b_ngl == 1 && p.c_ngl == 1 && p.n_pass == 1;
  for (int s = 0; s < p.n_pass; ++s) {
    const int n = g.lane + s * kSsLanes;
    s_h[s * kThreads + g.tid] =
        (g.cvalid && n < N && p.init != nullptr) ? p.init[((int64_t)g.b * D + g.c) * N + n] : 0.f;
  }
  for (int k = 0; k < p.n_chunks; ++k) {
    const int t0 = k * kT, nt = min(kT, p.seqlen - t0);
    stage_tile<T>(p, g, t0, nt, s_u, s_dt, s_dtu, nullptr, s_z, s_B, s_C, s_keep, fast, fast ? s_dd : nullptr);
    float tot0 = 0.f, tot1 = 0.f;
    for (int s = 0; s < p.n_pass; ++s) {
      const int n = g.lane + s * kSsLanes;
      const bool nvalid = g.cvalid && n < N;
      const float A2 = nvalid ? p.A[(int64_t)g.c * N + n] * kLog2e : 0.f;
      float h = s_h[s * kThreads + g.tid];
      if (p.ckpt != nullptr && nvalid) p.ckpt[(((int64_t)g.b * p.n_chunks + k) * D + g.c) * N + n] = h;
      float acc[kT];
      const float* Bp = s_B + g.lgb * NP + n;
      const float* Cp = s_C + g.lgc * NP + n;
      if (fast) {
        const float2* dd = s_dd + g.ci;
        const float2* bc = reinterpret_cast<const float2*>(s_B) + n;
        if (p.seq_idx != nullptr) fwd_tile_bc<true>(h, acc, A2, dd, bc, s_keep);
        else fwd_tile_bc<false>(h, acc, A2, dd, bc, s_keep);
      } else {
        if (p.seq_idx != nullptr) fwd_tile<true>(h, acc, A2, s_dt, s_dtu, Bp, bw, Cp, cw, s_keep, g.ci);
        else fwd_tile<false>(h, acc, A2, s_dt, s_dtu, Bp, bw, Cp, cw, s_keep, g.ci);
      }
      s_h[s * kThreads + g.tid] = h;
      reduce_scatter(acc, g.lane);
      tot0 += acc[0];
      tot1 += acc[1];
    }
    if (p.y != nullptr) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int k2 = (2 * g.lane + i) * kRow + g.ci;
        float y = (i == 0 ? tot0 : tot1) + Dsk * s_u[k2];
        if (p.z != nullptr) {
          const float zz = s_z[k2];
          y *= zz * sigmoidf_(zz);
        }
        s_y[k2] = y;
      }
      __syncthreads();
      T* y = static_cast<T*>(p.y) + (int64_t)g.b * p.seqlen * D;
      for (int idx = g.tid; idx < kT * kSsChannels; idx += kThreads) {
        const int ci = idx % kSsChannels, t = idx / kSsChannels;
        if (t < nt && g.c0 + ci < D) y[(int64_t)(t0 + t) * D + g.c0 + ci] = from_f<T>(s_y[t * kRow + ci]);
      }
    }
    __syncthreads();  // the next tile overwrites the staged inputs
  }
  if (p.final_state != nullptr) {
    for (int s = 0; s < p.n_pass; ++s) {
      const int n = g.lane + s * kSsLanes;
      if (g.cvalid && n < N) p.final_state[((int64_t)g.b * D + g.c) * N + n] = s_h[s * kThreads + g.tid];
    }
  }
}

}  // namespace sscan

template <typename T>
void launch_sscan_fwd(const SScanParams& p, void* stream) {
  if constexpr (sizeof(T) == 2) {
    if (p.fwd_v7) {  // v7 (sscan_fwd7.cuh) where the host found it applicable
      launch_sscan_fwd7<T>(p, stream);
      return;
    }
  }
  if (p.fwd_k != 0) {  // v2 (sscan_fwd2.cuh) where the host found it applicable
    launch_sscan_fwd2<T>(p, stream);
    return;
  }
  const dim3 grid((p.dim + kSsChannels - 1) / kSsChannels, p.batch), block(kSsLanes, kSsChannels);
  const int smem = sscan_fwd_smem_bytes(p);
  if (smem > 48 * 1024)  // opt-in above the default limit (once per size is enough, but it is cheap)
    APRIEL_CUDA_CHECK(cudaFuncSetAttribute(sscan::sscan_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  sscan::sscan_fwd_kernel<T><<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>(p);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace apriel
