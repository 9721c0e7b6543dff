// Fused Apriel-H1 mixer scan, forward, v6 (session 4; APRIEL_SCAN_FWD=v6): v5's K = 8 arithmetic with WARP
// SPECIALISATION, for batch 1 (16-bit activations; fp32 keeps v5).
//
// Why: at batch 1 a block (one head) is alone with one other block on its SM (256 blocks, 132 SMs) and v4 / v5
// run each tile's phases one after the other with __syncthreads between them: staging + conversion + dt_proj
// (phase A), the per-(channel, token) prep (B: MUFU-heavy, ~35 instructions per item), then the recurrence (C).
// ncu (lead, b1 L8192): ~3,220 cycles per tile for 1,015 instructions per warp, ~2 warps per scheduler, 63 %
// issue: latency-bound. Here producer warps do A + B of tile i + 1 (and the copies and y stores) while the
// consumer warps run the recurrence of tile i, so the two overlap instead of adding up, and the SM holds 6
// warps per block instead of 4.
//
// Block = one head of one sequence, 192 threads:
//   warps 0-3 (consumers, 128 threads): v5's K = 8 scan mapping (thread = channel sch, lane j, states 2j, 2j+1):
//     wait FULL[i&1] -> recurrence over the tile's ud[i&1] and raw B / C -> reduce-scatter -> gate -> y[i&1]
//     -> arrive EMPTY[i&1];
//   warps 4-5 (producers, 64 threads): wait EMPTY of tile i-2 -> store its y -> issue the copies of tile i+1 ->
//     wait the copies of tile i -> A (x to fp32 with the halo, document ids, dt_proj by mma) -> prep (8 tokens of
//     one channel per thread) -> ud[i&1], ug[i&1] -> arrive FULL[i&1].
// Named barriers (bar.sync / bar.arrive, 192 threads): FULL0/1 = 1/2, EMPTY0/1 = 3/4; 5 = producers only (64).
// Buffers: raw tiles x3 (consumers read tile i's B / C while producers prep tile i+1 and tile i+2's copies may
// not start before the consumers are done with tile i-1), ud / ug / y by tile parity, xf by parity (halo chain),
// one dtp (producers only). The arithmetic (prep formulas and order, recurrence, reduce-scatter, gate) is v5's
// at K = 8: outputs are bitwise v5k8's (tests/test_mixer_scan.py checks it).
#pragma once
#include "mixer_scan_fwd4.cuh"

namespace apriel {
namespace scan6 {

using scan::kChunk;
using scan::kLog2e;
using scan::kN;
using scan::from_f;
using scan::to_f;
using namespace scan4;

constexpr int kK = 8;                 // consumer lanes per channel
constexpr int kNS = kN / kK;          // states per consumer thread
constexpr int kNC = kN * kK;          // 128 consumer threads
constexpr int kNP = 64;               // producer threads
constexpr int kNT = kNC + kNP;        // 192
constexpr int kTPT = kChunk * kN / kNP;  // 8 prep tokens per producer thread
constexpr int kBarFull = 1, kBarEmpty = 3, kBarProd = 5;

__device__ __forceinline__ void bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

// kSR (APRIEL_SCAN_FWD=v6s): the consumers' K-lane readout sum through shared memory instead of the shuffle
// reduce-scatter (121 instructions per warp and tile: 28 SHFL + 56 FSEL + 28 FADD + bookkeeping): 4 rounds of
// 8 tokens, each lane stores its 8 partials (8 STS), reads the 8 lanes' partials of one token (2 LDS.128) and adds
// them in the reduce-scatter's tree order ((0+4)+(2+6))+((1+5)+(3+7)): the same bits, ~72 instructions.
// Scratch per consumer warp: 4 channels x 72 words (row of a channel = 8 tokens x 8 lanes + 8 words of skew, so the
// 32 scalar stores of a token hit 32 banks and the 16-byte reads of a quarter-warp 32 banks).
constexpr int kRedRow = 72;
template <typename T, int kR, bool kSeq>
struct Smem6 {
  static constexpr int kUgStride = 18;  // v4 / v5 K = 8 gate layout
  alignas(16) float red[kNC / 32][4 * kRedRow];  // kSR only (4.5 KB)
  RawTile<T, kR> raw[3];
  alignas(16) float xf[2][skew_rows<kTPT>(kChunk + 3)][kN];
  alignas(16) int seqf[2][kSeq ? kChunk + 3 : 1];
  alignas(16) float dtp[skew_rows<kTPT>(kChunk)][kN];
  alignas(16) float2 ud[2][kChunk][kN];
  alignas(16) float2 ug[2][kChunk][kUgStride];
  alignas(16) T y[2][kChunk][kN];
};

// Stores tile `tile`'s y (rows < rows_valid) from y[buf]: producers only (ptid < kNP).
template <typename T>
__device__ __forceinline__ void store_y(T* y, const T (&ys)[kChunk][kN], int ptid, int t0, int rows_valid, int D, int c0) {
  constexpr int kVec = 16 / sizeof(T), kCPR = kN / kVec, kPieces = kChunk * kCPR;
#pragma unroll
  for (int k = 0; k < (kPieces + kNP - 1) / kNP; ++k) {
    const int i = ptid + k * kNP;
    const int row = i / kCPR, part = i % kCPR;
    if ((kPieces % kNP == 0 || i < kPieces) && row < rows_valid)
      *reinterpret_cast<uint4*>(y + (int64_t)(t0 + row) * D + c0 + part * kVec) =
          *reinterpret_cast<const uint4*>(&ys[row][part * kVec]);
  }
}

template <typename T, int kR, bool kSeq, bool kSR>
__global__ void __launch_bounds__(kNT, 2) mixer_scan_fwd6_kernel(MixerScanParams p) {
  static_assert(sizeof(T) == 2, "v6: 16-bit activations (dt_proj on tensor cores, B / C read from the raw tile)");
  constexpr int kKSteps = kR / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  using SM = Smem6<T, kR, kSeq>;
  SM& sm = *reinterpret_cast<SM*>(smem_raw);
  const int head = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, lane = tid % 32;
  const int group = head / p.heads_per_group, c0 = head * kN;
  const int D = p.d_inner, L = p.seqlen, R = p.dt_rank, W = p.width;
  const int n_tiles = p.n_chunks;
  T* y = static_cast<T*>(p.y) + (int64_t)b * L * D;

  if (tid >= kNC) {
    // ------------------------------------------------------------------------------------------ producers
    const int ptid = tid - kNC, pwarp = ptid / 32;
    const T* zx = static_cast<const T*>(p.zxbc) + (int64_t)b * p.zxbc_batch_stride;
    const int col_x = p.d_inner + group * kN, col_B = p.d_inner + p.d_xb + group * kN;
    const int col_C = p.d_inner + 2 * p.d_xb + head * kN, col_z = head * kN;
    auto stage_tile = [&](RawTile<T, kR>& r, int t0) {
      if (p.zxbc_vec16) stage_zxbc_vec16<T, kNP, kR>(p, r, zx, ptid, col_x, col_B, col_C, col_z, t0);
      else stage_zxbc_plain<T, kNP, kR>(p, r, zx, ptid, col_x, col_B, col_C, col_z, t0);
      stage_dt<T, kNP, kR>(p, r, b, ptid, t0);
      if (p.seq_idx != nullptr && ptid < kChunk)
        cp_async4(&r.seq[ptid], p.seq_idx + (int64_t)b * L + min(t0 + ptid, L - 1));
    };
    stage_tile(sm.raw[0], 0);
    cp_async_commit();

    // Prep mapping: channel pch, tokens pq * 8 .. pq * 8 + 7 of each tile (v4's K = 4 mapping).
    const int pch = ptid % kN, pq = ptid / kN, pc = c0 + pch;
    const int wch = p.repeat_before_conv ? pc : group * kN + pch;
    float w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int src = i - (4 - W);
      w[i] = src >= 0 ? ld_param(p.conv_w_raw, (int64_t)wch * W + src) : 0.f;
    }
    const float cb = p.conv_b_raw.ptr != nullptr ? ld_param(p.conv_b_raw, wch) : 0.f;
    const float dtb2 = 2.f * ld_param(p.dt_b_raw, pc);
    unsigned wb[2][kKSteps][2];
    {
      const int g = lane / 4, q = lane % 4;
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int k = ks * 16 + hf * 8 + 2 * q;
            const int64_t row = (int64_t)(c0 + n * 8 + g) * R;
            wb[n][ks][hf] = MmaOp<T>::pack(k < R ? ld_param(p.dt_w_raw, row + k) : 0.f,
                                           k + 1 < R ? ld_param(p.dt_w_raw, row + k + 1) : 0.f);
          }
    }
    // Tile 0's halo: the initial conv state in rows kChunk.. of parity 1 (as v4).
    if (ptid < 3 * kN) {
      const int k = ptid / kN, ch = ptid % kN, kk = (W - 1) + (k - 3);
      sm.xf[1][skew_row<kTPT>(kChunk + k)][ch] = (p.init_conv != nullptr && kk >= 0)
          ? p.init_conv[((int64_t)b * p.d_xb + group * kN + ch) * (W - 1) + kk] : 0.f;
    }
    if (kSeq && ptid < 3) sm.seqf[1][kChunk + ptid] = p.seq_idx[(int64_t)b * L];

    int rb = 0;  // raw buffer of tile i (i % 3)
    for (int tile = 0; tile < n_tiles; ++tile) {
      const int t0 = tile * kChunk, par = tile & 1;
      const int Tv = min(kChunk, L - t0);
      if (tile >= 2) {  // consumers are done with tile - 2: its ud / ug / y buffers and raw tile are free
        bar_sync(kBarEmpty + par, kNT);
        store_y<T>(y, sm.y[par], ptid, t0 - 2 * kChunk, kChunk, D, c0);
      }
      const int rb_next = rb == 2 ? 0 : rb + 1;
      if (tile + 1 < n_tiles) {
        stage_tile(sm.raw[rb_next], t0 + kChunk);
        cp_async_commit();
        cp_async_wait_one();
      } else {
        cp_async_wait_all();
      }
      bar_sync(kBarProd, kNP);  // tile's copies visible to all producers; the previous prep is done with dtp
      const RawTile<T, kR>& r = sm.raw[rb];
      // A: x -> fp32 after the 3 halo rows, document ids, dt_proj by mma (v4's phase A with 64 threads).
      {
        constexpr int kQuads = kChunk * kN / 4;
#pragma unroll
        for (int k = 0; k < kQuads / kNP; ++k) {
          const int q4 = ptid + k * kNP;
          cvt4<T>(&r.x[0][0] + q4 * 4, &sm.xf[par][skew_row<kTPT>(3 + q4 / 4)][(q4 % 4) * 4]);
        }
        if (ptid < 3 * kN / 4) {
          const int row = ptid / 4, part = ptid % 4;
          *reinterpret_cast<float4*>(&sm.xf[par][skew_row<kTPT>(row)][part * 4]) =
              *reinterpret_cast<const float4*>(&sm.xf[par ^ 1][skew_row<kTPT>(kChunk + row)][part * 4]);
        }
        if constexpr (kSeq) {
          if (ptid < kChunk) sm.seqf[par][3 + ptid] = r.seq[ptid];
          else if (ptid < kChunk + 3) sm.seqf[par][ptid - kChunk] = sm.seqf[par ^ 1][ptid];
        }
        const int g = lane / 4, q = lane % 4;
#pragma unroll
        for (int pi = 0; pi < 2; ++pi) {  // (m-tile, n-tile) pairs of the 32 x 16 output: 2 per producer warp
          const int pair = pwarp + pi * 2;
          const int m = pair & 1, n = pair >> 1;
          float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int ks = 0; ks < kKSteps; ++ks) {
            unsigned a[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int row = m * 16 + g + (i & 1) * 8, k = ks * 16 + (i >> 1) * 8 + 2 * q;
              a[i] = k < R ? *reinterpret_cast<const unsigned*>(&r.dt[row][k]) : 0u;
            }
            const unsigned bf[2] = {n ? wb[1][ks][0] : wb[0][ks][0], n ? wb[1][ks][1] : wb[0][ks][1]};
            MmaOp<T>::run(d, a, bf);
          }
          *reinterpret_cast<float2*>(&sm.dtp[skew_row<kTPT>(m * 16 + g)][n * 8 + 2 * q]) = make_float2(d[0], d[1]);
          *reinterpret_cast<float2*>(&sm.dtp[skew_row<kTPT>(m * 16 + g + 8)][n * 8 + 2 * q]) = make_float2(d[2], d[3]);
        }
      }
      bar_sync(kBarProd, kNP);
      // B: prep of 8 consecutive tokens of channel pch (v5's formulas and order).
      {
        const int tb = pq * kTPT;
        const float* xrow = &sm.xf[par][tb + pq][pch];
        const float* drow = &sm.dtp[tb + pq][pch];
        const T* zcol = &r.z[tb][pch];
        float2* udcol = &sm.ud[par][tb][pch];
        float2* ugcol = &sm.ug[par][tb][pch];
        float xw[kTPT + 3];
        int sw[kTPT + 3];
#pragma unroll
        for (int k = 0; k < kTPT + 3; ++k) {
          xw[k] = xrow[(k + (k >> 3)) * kN];
          sw[k] = kSeq ? sm.seqf[par][tb + k] : 0;
        }
#pragma unroll
        for (int i = 0; i < kTPT; ++i) {
          const int t = tb + i;
          float cv = cb;
#pragma unroll
          for (int k = 0; k < 4; ++k) cv = fmaf(w[k], (!kSeq || sw[i + k] == sw[i + 3]) ? xw[i + k] : 0.f, cv);
          const float u = cv * sigmoid_fast(cv);
          const float dp = dtb2 + drow[i * kN];
          const float delta = softplus_select(dp);
          const bool keep = !kSeq || sw[i + 2] == sw[i + 3];
          const float zz = to_f(zcol[i * kN]);
          udcol[i * kN] = t < Tv ? make_float2(keep ? delta : __int_as_float(0x7f800000), delta * u)
                                 : make_float2(0.f, 0.f);
          ugcol[i * SM::kUgStride] = make_float2(u, zz * sigmoid_fast(zz));
        }
      }
      bar_arrive(kBarFull + par, kNT);
      rb = rb_next;
    }
  } else {
    // ------------------------------------------------------------------------------------------ consumers
    const int sch = tid / kK, j = tid % kK, cs = c0 + sch;
    float A2[kNS], h[kNS];
#pragma unroll
    for (int s = 0; s < kNS; ++s) {
      const int n = j * kNS + s;
      A2[s] = -__expf(ld_param(p.A_log_raw, (int64_t)cs * kN + n)) * kLog2e;
      h[s] = p.init_ssm != nullptr ? p.init_ssm[((int64_t)b * D + cs) * kN + n] : 0.f;
    }
    const float Dc = ld_param(p.D_raw, cs);
    int rb = 0;
    for (int tile = 0; tile < n_tiles; ++tile) {
      const int par = tile & 1;
      if (p.ckpt != nullptr)
        scan::store_states<kNS>(p.ckpt + (((int64_t)b * n_tiles + tile) * D + cs) * kN + j * kNS, h);
      bar_sync(kBarFull + par, kNT);
      const RawTile<T, kR>& r = sm.raw[rb];
      const float2 (&ud)[kChunk][kN] = sm.ud[par];
      // v4 / v5's K = 8 recurrence: fully unrolled, operands 2 tokens ahead, B / C from the raw 16-bit tile.
      constexpr int kPF = 2;
      float acc[kChunk];
      float2 ep[kPF + 1];
      unsigned bcp[kPF + 1][2];
      auto load_bc = [&](int t, unsigned (&dst)[2]) {
        dst[0] = *reinterpret_cast<const unsigned*>(&r.B[t][j * kNS]);
        dst[1] = *reinterpret_cast<const unsigned*>(&r.C[t][j * kNS]);
      };
#pragma unroll
      for (int t = 0; t < kPF; ++t) {
        ep[t] = ud[t][sch];
        load_bc(t, bcp[t]);
      }
#pragma unroll
      for (int t = 0; t < kChunk; ++t) {
        if (t + kPF < kChunk) {
          ep[(t + kPF) % (kPF + 1)] = ud[t + kPF][sch];
          load_bc(t + kPF, bcp[(t + kPF) % (kPF + 1)]);
        }
        const float2 e = ep[t % (kPF + 1)];
        const float2 bb = unpack2<T>(bcp[t % (kPF + 1)][0]), cc = unpack2<T>(bcp[t % (kPF + 1)][1]);
        const float Bv[2] = {bb.x, bb.y}, Cv[2] = {cc.x, cc.y};
        float a = 0.f;
#pragma unroll
        for (int s = 0; s < kNS; ++s) {
          const float dA = ex2(e.x * A2[s]);
          h[s] = fmaf(dA, h[s], e.y * Bv[s]);
          a = fmaf(Cv[s], h[s], a);
        }
        acc[t] = a;
      }
      if constexpr (kSR) {
        float* red = &sm.red[tid / 32][((tid % 32) / kK) * kRedRow];  // this lane's channel row
#pragma unroll
        for (int round = 0; round < kChunk / kK; ++round) {
#pragma unroll
          for (int k = 0; k < kK; ++k) red[k * kK + j] = acc[round * kK + k];
          __syncwarp();
          const float4 lo = *reinterpret_cast<const float4*>(&red[j * kK]);
          const float4 hi = *reinterpret_cast<const float4*>(&red[j * kK + 4]);
          const float total = ((lo.x + hi.x) + (lo.z + hi.z)) + ((lo.y + hi.y) + (lo.w + hi.w));
          __syncwarp();
          const int t = round * kK + j;
          const float2 q = sm.ug[par][t][sch];
          sm.y[par][t][sch] = from_f<T>((total + Dc * q.x) * q.y);
        }
      } else {
        const int sigma = reduce_scatter_interleaved<kK>(acc, j);
#pragma unroll
        for (int i = 0; i < kChunk / kK; ++i) {
          const int t = kK * i + sigma;
          const float2 q = sm.ug[par][t][sch];
          sm.y[par][t][sch] = from_f<T>((acc[i] + Dc * q.x) * q.y);
        }
      }
      if (tile + 2 < n_tiles) bar_arrive(kBarEmpty + par, kNT);
      rb = rb == 2 ? 0 : rb + 1;
    }
    scan::store_states<kNS>(p.final_ssm + ((int64_t)b * D + cs) * kN + j * kNS, h);
  }
  __syncthreads();  // every tile's y is in smem (the last two not stored yet); producers' xf is final
  if (tid >= kNC) {
    const int ptid = tid - kNC;
    const int last = n_tiles - 1, Tv = L - last * kChunk;
    if (n_tiles >= 2) store_y<T>(y, sm.y[(last - 1) & 1], ptid, (last - 1) * kChunk, kChunk, D, c0);
    store_y<T>(y, sm.y[last & 1], ptid, last * kChunk, Tv, D, c0);
    // Final conv state: the last W-1 x inputs of the last document, written by the group's first head (as v4).
    const int hw = W - 1, lp = last & 1;
    if (head % p.heads_per_group == 0 && ptid < kN * hw) {
      const int ch = ptid / hw, k = ptid % hw, row = Tv + 3 - hw + k;
      const float v = sm.xf[lp][skew_row<kTPT>(row)][ch];
      const bool same = !kSeq || sm.seqf[lp][row] == sm.seqf[lp][Tv + 2];
      static_cast<T*>(p.final_conv)[((int64_t)b * p.d_xb + group * kN + ch) * hw + k] = from_f<T>(same ? v : 0.f);
    }
  }
}

template <typename T, int kR, bool kSeq, bool kSR>
void launch(const MixerScanParams& p, void* stream) {
  const size_t smem = sizeof(Smem6<T, kR, kSeq>);
  auto kernel = mixer_scan_fwd6_kernel<T, kR, kSeq, kSR>;
  static bool configured = false;  // per instantiation; a race here only repeats an idempotent call
  if (!configured) {
    if (smem > 48 * 1024)
      APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           (int)cudaSharedmemCarveoutMaxShared));
    configured = true;
  }
  dim3 grid(p.d_inner / kN, p.batch);
  kernel<<<grid, kNT, smem, static_cast<cudaStream_t>(stream)>>>(p);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace scan6

// 16-bit activations only (the host sends fp32 to v5). smem_reduce: v6s (kSR).
template <typename T>
void launch_mixer_scan_fwd6(const MixerScanParams& p, void* stream, bool smem_reduce) {
  const bool seq = p.seq_idx != nullptr;
  if (smem_reduce) {
    if (p.dt_rank <= 16) seq ? scan6::launch<T, 16, true, true>(p, stream) : scan6::launch<T, 16, false, true>(p, stream);
    else seq ? scan6::launch<T, 32, true, true>(p, stream) : scan6::launch<T, 32, false, true>(p, stream);
    return;
  }
  if (p.dt_rank <= 16) seq ? scan6::launch<T, 16, true, false>(p, stream) : scan6::launch<T, 16, false, false>(p, stream);
  else seq ? scan6::launch<T, 32, true, false>(p, stream) : scan6::launch<T, 32, false, false>(p, stream);
}

}  // namespace apriel
