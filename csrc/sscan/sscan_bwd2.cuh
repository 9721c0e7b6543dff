// Backward of the generic selective scan, v2 (the forward v2's shapes: d_state 16, d_inner % 16 == 0, one B
// and one C group per block). Selected by APRIEL_SSCAN_BWD=v2 (opt-in until a GPU run has checked it).
//
// Why: v1 (sscan_bwd.cuh) gives a thread one state (16 lanes per channel) at 235 registers, 1 block of 8 warps
// per SM, and pays ~9 shared-memory accesses per (channel, state, token) element. v2 reuses the forward v2's
// machinery: K = 8 lanes per channel (2 states per thread: the tile's 32 recomputed states of both fit in
// registers), cp.async raw tiles (u, delta, z, B, C, seq_idx, dy) in the tensors' own dtype and orientation,
// 16-bit B / C reads, per-(channel, token) values computed once in a prep pass, a branch-free packed loop.
// The adjoint carry and the dA accumulators stay in registers across tiles (a thread owns its states for the
// whole sequence). Per tile, in reverse tile order:
//   prep: (softplus(delta + bias), delta u), (u, gy = dy silu(z)), document offsets;           barrier
//   recompute the tile's states from the checkpoint (hs[t][s]) and the readout C h (for dz);
//   adjoint G_t = C_t gy_t + a_{t+1} G_{t+1}: per token d delta and du partials (summed over the thread's
//   states, reduce-scattered over the K lanes after the tile), dB = G delta u and dC = gy h into smem;
//   per (channel, token) epilogue -> smem;                                                       barrier
//   dB / dC summed over the block's 16 channels (fixed order) -> per-block partials; du / d delta / dz stored.
// Same formulas and the same partial-buffer layout as v1, so the host epilogue is shared.
#pragma once
#include "head_reduce.cuh"
#include "sscan_fwd2.cuh"

namespace apriel {
namespace sscan2 {

constexpr int kRB = kC * kN + 4;  // dB / dC contribution row per token: [channel * 16 + state], padded

template <typename T>
struct RawB {
  Raw<T> f;                           // the forward's raw tile
  alignas(16) T dy[kT * kC];          // [t * 16 + channel] (dy is (b, L, D) contiguous)
};

template <typename T>
struct SmemB {
  RawB<T> raw[2];                     // by tile parity
  alignas(16) float2 ud[kT][kC];      // (softplus(delta + bias), delta u); (0, 0) past the end
  alignas(16) float2 ug[kT][kC];      // (u, gy)
  alignas(16) float m[kT];            // decay offset: -inf at a document start
  alignas(16) float rB[kT][kRB];      // dB contributions of each (token, channel, state)
  alignas(16) float rC[kT][kRB];      // dC contributions
  alignas(16) float o[3][kT][kC];     // du, d delta, dz per (token, channel)
};

template <typename T, int NT>
__device__ __forceinline__ void stage_bwd(const SScanParams& p, RawB<T>& r, int b, int c0, int t0, int tid) {
  stage<T, NT>(p, r.f, b, c0, t0, tid);
  stage_tensor<T, NT>(r.dy, static_cast<const T*>(p.dy) + (int64_t)b * p.seqlen * p.dim + c0, p.dim, 1, false,
                      ((p.v2_vec >> kV2Dy) & 1u) != 0, t0, p.seqlen, tid);
}

template <typename T, bool kSeq, bool kBT>
__global__ void __launch_bounds__(kC * 8, 2) sscan_bwd2_kernel(SScanParams p) {
  constexpr int K = 8;
  constexpr int NT = kC * K;         // 128 threads
  constexpr int NS = kN / K;         // 2 states per thread
  constexpr int TPT = kT * kC / NT;  // prep tokens per thread (4)
  using G = Group<T, K, kBT>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SmemB<T>& sm = *reinterpret_cast<SmemB<T>*>(smem_raw);
  const int tid = threadIdx.x, b = blockIdx.y, blk = blockIdx.x, c0 = blk * kC;
  const int D = p.dim, L = p.seqlen, n_tiles = p.n_chunks, nblk = gridDim.x;

  stage_bwd<T, NT>(p, sm.raw[(n_tiles - 1) & 1], b, c0, (n_tiles - 1) * kT, tid);
  cp_async_commit();

  // Prep mapping: channel pch, tokens pq * TPT .. + TPT - 1.
  const int pch = tid % kC, pq = tid / kC, pc = c0 + pch;
  const float bias = p.delta_bias != nullptr ? p.delta_bias[pc] : 0.f;
  const bool has_z = p.z != nullptr;
  const bool tf_u = (p.v2_tfast >> kV2U) & 1u, tf_d = (p.v2_tfast >> kV2Delta) & 1u, tf_z = (p.v2_tfast >> kV2Z) & 1u;

  // Scan mapping: channel sch, lane j, states j NS + s.
  const int sch = tid / K, j = tid % K, cs = c0 + sch;
  const float Dsk = p.Dskip != nullptr ? p.Dskip[cs] : 0.f;
  const float bias_s = p.delta_bias != nullptr ? p.delta_bias[cs] : 0.f;
  float Ac[NS], A2[NS], carry[NS], dA[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const int n = j * NS + s;
    Ac[s] = p.A[(int64_t)cs * kN + n];
    A2[s] = Ac[s] * kLog2e;
    carry[s] = p.dfinal != nullptr ? p.dfinal[((int64_t)b * D + cs) * kN + n] : 0.f;
    dA[s] = 0.f;
  }
  float dD_acc = 0.f, ddb_acc = 0.f;
  const float* ck = p.ckpt_in + ((int64_t)b * n_tiles * D + cs) * kN + j * NS;  // + tile * D * kN
  float2 h0n = *reinterpret_cast<const float2*>(ck + (int64_t)(n_tiles - 1) * D * kN);

  for (int tile = n_tiles - 1; tile >= 0; --tile) {
    const int t0 = tile * kT, par = tile & 1, nt = min(kT, L - t0);
    const RawB<T>& r = sm.raw[par];
    const float h0[NS] = {h0n.x, h0n.y};
    if (tile > 0) h0n = *reinterpret_cast<const float2*>(ck + (int64_t)(tile - 1) * D * kN);  // next tile's
    cp_async_wait_all();
    __syncthreads();  // S1: this tile's copies visible; every reader of the previous tile's smem is done
    if (tile > 0) {
      stage_bwd<T, NT>(p, sm.raw[par ^ 1], b, c0, t0 - kT, tid);
      cp_async_commit();
    }
    // Prep per (channel, token).
#pragma unroll
    for (int i = 0; i < TPT; ++i) {
      const int t = pq * TPT + i;
      const float u = to_f(r.f.a[kV2U][tf_u ? Geom<T>::tf(pch, t) : t * kC + pch]);
      const float v = to_f(r.f.a[kV2Delta][tf_d ? Geom<T>::tf(pch, t) : t * kC + pch]) + bias;
      const float dt = p.softplus ? sscan::softplus_v2(v, p.fast_prep) : v;  // as the forward v2
      float gy = to_f(r.dy[t * kC + pch]);
      if (has_z) {
        const float zz = to_f(r.f.a[kV2Z][tf_z ? Geom<T>::tf(pch, t) : t * kC + pch]);
        gy *= zz * sscan::sigmoid_fast(zz);
      }
      sm.ud[t][pch] = t < nt ? make_float2(dt, dt * u) : make_float2(0.f, 0.f);
      sm.ug[t][pch] = make_float2(u, t < nt ? gy : 0.f);
    }
    if constexpr (kSeq) {
      if (tid < kT) sm.m[tid] = (t0 + tid > 0 && r.f.seq[tid + 1] != r.f.seq[tid]) ? -__int_as_float(0x7f800000) : 0.f;
    }
    __syncthreads();  // S2

    const T* Bt = r.f.a[kV2B];
    const T* Ct = r.f.a[kV2C];
    // Recompute the tile's states (hs) and the readout (y without the D skip, for dz), reduce-scattered over
    // the K lanes per half tile (16 tokens: half the registers live at once). Lane j then owns tokens
    // 16 hf + base + i (i < kQ) of channel sch, for the readout and the adjoint alike.
    constexpr int kH = kT / 2, kQ = kH / K;
    float hs[kT][NS];
    float yv[2][kQ];
    int base = 0;
    {
      float h[NS] = {h0[0], h0[1]};
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float acc[kH];
#pragma unroll
        for (int tg = 4 * hf; tg < 4 * hf + 4; ++tg) {
          unsigned wb[G::kWords], wc[G::kWords];
          G::load(Bt, j, tg, wb);
          G::load(Ct, j, tg, wc);
#pragma unroll
          for (int tt = 0; tt < 4; ++tt) {
            const int t = 4 * tg + tt;
            const float2 d = sm.ud[t][sch];
            const float mo = kSeq ? sm.m[t] : 0.f;
            float part = 0.f;
#pragma unroll
            for (int s = 0; s < NS; ++s) {
              const float arg = kSeq ? fmaf(d.x, A2[s], mo) : d.x * A2[s];
              h[s] = fmaf(ex2(arg), h[s], d.y * G::get(wb, tt, s));
              hs[t][s] = h[s];
              part = fmaf(G::get(wc, tt, s), h[s], part);
            }
            acc[t - hf * kH] = part;
          }
        }
        reduce_scatter<K, kH>(acc, j, base);
#pragma unroll
        for (int i = 0; i < kQ; ++i) yv[hf][i] = acc[i];
      }
    }

    // Adjoint, tokens in reverse. accD: d delta partial sum_s G (u B + a A h_{t-1}); accU: du partial sum_s G B.
    float dsum[2][kQ], usum[2][kQ];
#pragma unroll
    for (int hf = 1; hf >= 0; --hf) {
      float accD[kH], accU[kH];
#pragma unroll
      for (int tg = 4 * hf + 3; tg >= 4 * hf; --tg) {
        unsigned wb[G::kWords], wc[G::kWords];
        G::load(Bt, j, tg, wb);
        G::load(Ct, j, tg, wc);
#pragma unroll
        for (int tt = 3; tt >= 0; --tt) {
          const int t = 4 * tg + tt;
          const float2 d = sm.ud[t][sch], x = sm.ug[t][sch];
          const float mo = kSeq ? sm.m[t] : 0.f;
          float pd = 0.f, pu = 0.f, rb[NS], rc[NS];
#pragma unroll
          for (int s = 0; s < NS; ++s) {
            const float a = ex2(kSeq ? fmaf(d.x, A2[s], mo) : d.x * A2[s]);
            const float Gs = fmaf(G::get(wc, tt, s), x.y, carry[s]);
            const float hp = t > 0 ? hs[t > 0 ? t - 1 : 0][s] : h0[s];
            const float GB = Gs * G::get(wb, tt, s);
            const float q = Gs * a * hp;
            pu += GB;
            pd += fmaf(GB, x.x, q * Ac[s]);
            dA[s] = fmaf(q, d.x, dA[s]);
            rb[s] = Gs * d.y;
            rc[s] = x.y * hs[t][s];
            carry[s] = a * Gs;
          }
          accD[t - hf * kH] = pd;
          accU[t - hf * kH] = pu;
          *reinterpret_cast<float2*>(&sm.rB[t][sch * kN + j * NS]) = make_float2(rb[0], rb[1]);
          *reinterpret_cast<float2*>(&sm.rC[t][sch * kN + j * NS]) = make_float2(rc[0], rc[1]);
        }
      }
      reduce_scatter<K, kH>(accD, j, base);
      reduce_scatter<K, kH>(accU, j, base);
#pragma unroll
      for (int i = 0; i < kQ; ++i) {
        dsum[hf][i] = accD[i];
        usum[hf][i] = accU[i];
      }
    }

    // Per (channel, token) epilogue.
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
#pragma unroll
      for (int i = 0; i < kQ; ++i) {
        const int t = hf * kH + base + i;
        const float2 d = sm.ud[t][sch], x = sm.ug[t][sch];  // (dt, dtu), (u, gy)
        const float v = to_f(r.f.a[kV2Delta][tf_d ? Geom<T>::tf(sch, t) : t * kC + sch]) + bias_s;
        float dd = dsum[hf][i];
        if (p.softplus && v <= 20.f) dd *= sscan::sigmoid_fast(v);
        sm.o[0][t][sch] = fmaf(d.x, usum[hf][i], Dsk * x.y);
        sm.o[1][t][sch] = dd;
        if (has_z) {
          const float zz = to_f(r.f.a[kV2Z][tf_z ? Geom<T>::tf(sch, t) : t * kC + sch]);
          const float sg = sscan::sigmoid_fast(zz);
          const float dyv = to_f(r.dy[t * kC + sch]);
          const float y = fmaf(Dsk, x.x, yv[hf][i]);
          sm.o[2][t][sch] = dyv * y * sg * (1.f + zz * (1.f - sg));
        }
        if (t < nt) {
          dD_acc = fmaf(x.y, x.x, dD_acc);
          ddb_acc += dd;
        }
      }
    }
    __syncthreads();  // S3

    // dB / dC: sum of the block's 16 channels per (token, state) in a fixed order -> per-block partials
    // (head_reduce.cuh, shared with mixer_scan_bwd4). The store captures by reference: SASS identical to the
    // inline loop it replaced; by value it saved ~150 instructions per kernel but fp32 spilled 8-12 bytes more.
    head_reduce_bc<kT, kN, kC, kRB, NT>(sm.rB, sm.rC, nt, tid, [&](int which, int t, int q, float4 sum) {
      float* part = which == 0 ? p.dB_part : p.dC_part;
      *reinterpret_cast<float4*>(part + (((int64_t)b * L + t0 + t) * nblk + blk) * kN + 4 * q) = sum;
    });
    // du, d delta, dz in (b, L, D) (du fp32 when the host sums grouped-u copies).
    const int64_t row0 = (int64_t)b * L + t0;
    for (int idx = tid; idx < kT * kC; idx += NT) {
      const int t = idx / kC, ch = idx % kC;
      if (t >= nt) continue;
      const int64_t o = (row0 + t) * D + c0 + ch;
      if (p.du_f32) static_cast<float*>(p.du)[o] = sm.o[0][t][ch];
      else static_cast<T*>(p.du)[o] = from_f<T>(sm.o[0][t][ch]);
      static_cast<T*>(p.ddelta)[o] = from_f<T>(sm.o[1][t][ch]);
      if (has_z) static_cast<T*>(p.dz)[o] = from_f<T>(sm.o[2][t][ch]);
    }
  }
  // dA, d initial state (the carry past token 0), dD and d delta_bias (summed over the K lanes, fixed order).
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const int64_t o = ((int64_t)b * D + cs) * kN + j * NS + s;
    p.dA_part[o] = dA[s];
    if (p.dinit != nullptr) p.dinit[o] = carry[s];
  }
#pragma unroll
  for (int off = 1; off < K; off <<= 1) {
    dD_acc += __shfl_xor_sync(0xffffffffu, dD_acc, off);
    ddb_acc += __shfl_xor_sync(0xffffffffu, ddb_acc, off);
  }
  if (j == 0) {
    p.dD_part[(int64_t)b * D + cs] = dD_acc;
    p.ddb_part[(int64_t)b * D + cs] = ddb_acc;
  }
}

template <typename T, bool kSeq, bool kBT>
void launch_bwd(const SScanParams& p, void* stream) {
  constexpr int smem = sizeof(SmemB<T>);
  auto kernel = sscan_bwd2_kernel<T, kSeq, kBT>;
  static bool configured = false;  // per instantiation; a race here only repeats an idempotent call
  if (!configured) {
    APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           (int)cudaSharedmemCarveoutMaxShared));
    configured = true;
  }
  const dim3 grid(p.dim / kC, p.batch);
  kernel<<<grid, kC * 8, smem, static_cast<cudaStream_t>(stream)>>>(p);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace sscan2

template <typename T>
void launch_sscan_bwd2(const SScanParams& p, void* stream) {
  const bool seq = p.seq_idx != nullptr;
  const bool bt = ((p.v2_tfast >> kV2B) & 1u) != 0;
  if (bt) seq ? sscan2::launch_bwd<T, true, true>(p, stream) : sscan2::launch_bwd<T, false, true>(p, stream);
  else seq ? sscan2::launch_bwd<T, true, false>(p, stream) : sscan2::launch_bwd<T, false, false>(p, stream);
}

}  // namespace apriel
