// Fused Apriel-H1 mixer scan, backward, v4: the forward v4's skeleton with the generic scan's v2 adjoint.
//
// Why a v4: v3 (mixer_scan_bwd.cuh) gives a thread ONE state (K = 16 lanes per channel, 255 registers, one
// block of 8 warps per SM), stages the tile through registers with per-element loads and pays ~85
// instructions per (channel, state, token). v4 (docs/notes/scan_bwd_plan.md, route 1 "Port"):
// - block = one head (16 channels) of one sequence, K = 8 lanes per channel, 2 states per thread: the tile's
//   32 recomputed states (hs[32][2]) stay in registers; launch bounds allow 2 blocks of 4 warps per SM;
// - cp.async raw tiles in reverse tile order (the forward v4's stage(): x, B, C, z, dt_low, seq_idx; plus dy,
//   the 3 x rows before the tile (conv halo) and their document ids), double-buffered by tile parity;
// - prep per (channel, token) as the forward v4 computes it (same formulas and operation order, so the
//   recomputed states follow the forward's checkpoints): conv + silu, dt_proj on tensor cores (16-bit
//   activations; CUDA cores for fp32), 2 b_dt + softplus, silu(z); a document start is a -inf decay offset;
// - B / C read from the raw 16-bit tile (one 32-bit word = a lane's 2 states);
// - the adjoint per (state, token): G = C dys + a G', dB = G delta u, dC = dys h, and per token the sums
//   sum_s G B (-> du, and d delta's u term) and sum_s G a h_{t-1} A (d delta's decay term), reduce-scattered
//   over the K lanes per half tile; dA_log = A sum G a h_{t-1} delta per thread;
// - dB / dC summed over the head's channels through padded smem rows in a fixed order (deterministic);
// - per (channel, token) epilogue of v3 (dz, D skip, silu', softplus', conv weight / bias sums) in the scan
//   mapping; the transposed conv (d conv input) after a barrier, with the 3 first rows of d(conv
//   pre-activation) of the tile AFTER (processed just before: parity buffers) as its halo.
// Outputs, partial-buffer layouts and the host epilogue are v3's (scan_api.cpp: mixer_scan_bwd_cuda).
// Phases per tile (reverse order):
//   S1 wait cp.async + barrier; issue tile-1's copies; A: x -> fp32 (+ halo / initial conv state), document
//   ids, dt_proj mma;                                                                          barrier S2
//   B  prep per (channel, token);                                                              barrier S2b
//   C  recompute states (registers) + readout; adjoint in reverse; epilogue per (channel, token) -> smem;
//                                                                                              barrier S3
//   D  dB / dC sums, transposed conv, dz / ddt_pre stores (coalesced), d initial conv state (tile 0).
#pragma once
#include "head_reduce.cuh"
#include "mixer_scan_fwd4.cuh"

#ifndef APRIEL_SCAN_BWD4_PARTS
#define APRIEL_SCAN_BWD4_PARTS 4  // reduce-scatter granularity (tokens per part = 32 / parts); ptxas: registers
#endif
#ifndef APRIEL_SCAN_BWD4_PF
#define APRIEL_SCAN_BWD4_PF 3     // adjoint: tokens whose shared operands are loaded ahead
#endif

namespace apriel {
namespace scan4b {

using scan::from_f;
using scan::kChunk;
using scan::kLog2e;
using scan::kMaxR;
using scan::kN;
using scan::to_f;
using scan4::cp_async16;
using scan4::cp_async4;
using scan4::stage_dt;
using scan4::stage_rows;
using scan4::stage_zxbc_plain;
using scan4::stage_zxbc_vec16;
using scan4::cp_async_commit;
using scan4::cp_async_wait_all;

constexpr int kK = 8;                  // lanes per channel
constexpr int kNT = kN * kK;           // 128 threads
constexpr int kNS = kN / kK;           // 2 states per thread
constexpr int kTPT = kChunk * kN / kNT;  // 4 prep tokens per thread
constexpr int kR = kMaxR;              // dt_low staged 32 wide (columns >= R masked)
constexpr int kRS = 20;                // padded fp32 row (rows r and r + 4, read by one warp, 16 banks apart)
// Row padding (ncu, first version: 37 % of the shared-load wavefronts were bank conflicts, and the kernel stalls
// on shared memory): dB / dC rows are read as float4 by 8-lane phases covering 2 tokens x 4 quads; a row length
// = 16 (mod 32) words puts the 2 tokens in opposite bank halves (4 (mod 32) gave 2-way conflicts). e4 / pe rows
// are read by the epilogue at 8 different tokens per channel: 17 float4 per row (else all 8 in one bank group).
// The fp32-B/C variant keeps the unpadded rows (its BCf tile would push the block past 2 per SM).
template <bool kBCf> struct Pad { static constexpr int kRB = kN * kN + (kBCf ? 4 : 16), kE = kBCf ? kN : kN + 1; };

template <typename T>
struct RawB4 {
  scan4::RawTile<T, kR> f;           // the forward's raw tile
  alignas(16) T dy[kChunk][kN];      // dy rows of the head (dy is (b, L, D) contiguous)
  alignas(16) T xh[4][kN];           // x at positions t0-3 .. t0-1 (row 3 unused)
  alignas(16) int seqh[4];           // their document ids (clamped to position 0)
};

template <typename T, bool kBCf>
struct SmemB4 {
  static constexpr int kRB = Pad<kBCf>::kRB, kE = Pad<kBCf>::kE;
  RawB4<T> raw[2];                    // by tile parity
  alignas(16) float xf[kChunk + 3][kRS];   // conv input fp32; row i = position t0 - 3 + i
  alignas(16) int seqf[2][kChunk + 4];     // document ids on the rows of xf, by tile parity
  alignas(16) float dtp[kChunk][kRS];      // dt_low . W_dt (16-bit types: mma)
  alignas(16) float dtw[sizeof(T) == 2 ? 1 : kN][kR + 4];  // W_dt rows of the head, zero past R (fp32 only)
  alignas(16) float cw[kN][4];             // right-aligned conv taps per channel
  alignas(16) float2 cbd[kN];              // (conv bias, 2 b_dt) per channel
  alignas(16) unsigned wfrag[sizeof(T) == 2 ? 32 : 1][8];  // mma B fragments of W^T per lane (16-bit only)
  alignas(16) float BCf[kBCf ? kChunk : 1][2 * kN];  // kBCf: per token and lane j: (B[2j], B[2j+1], C[2j], C[2j+1])
  alignas(16) float4 e4[kChunk][kE];       // (delta, delta u, decay offset 0 / -inf, dys = dy silu(z))
  alignas(16) float4 pe[kChunk][kE];       // (u, silu'(conv pre-act.), softplus'(its input), dz / y = dy silu'(z));
                                           // the epilogue overwrites (.x, .y) of its own item with (dz, ddt_pre)
  alignas(16) float rB[kChunk][kRB];       // dB contributions per (token, channel, state)
  alignas(16) float rC[kChunk][kRB];       // dC contributions
  alignas(16) float dco[2][kChunk][kRS];   // d(conv pre-activation), by tile parity; 0 past the end (rows
                                           // padded: the epilogue writes 8 tokens x 4 channels per warp)
};

// Volatile shared-memory accesses of the adjoint loop (see there): their order is kept by ptxas.
__device__ __forceinline__ unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ float4 lds_v4(const float4* p) {
  float4 v;
  asm volatile("ld.volatile.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(smem_addr(p)));
  return v;
}
// A lane's 2 values of a raw B / C row: one 32-bit word (16-bit types) or two (fp32).
template <int kW, typename T>
__device__ __forceinline__ void lds_words(const T* p, unsigned (&w)[kW]) {
  if constexpr (kW == 1) asm volatile("ld.volatile.shared.b32 %0, [%1];" : "=r"(w[0]) : "r"(smem_addr(p)));
  else asm volatile("ld.volatile.shared.v2.b32 {%0, %1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "r"(smem_addr(p)));
}
template <typename T, int kW>
__device__ __forceinline__ float2 words_pair(const unsigned (&w)[kW]) {
  if constexpr (sizeof(T) == 2) return scan4::unpack2<T>(w[0]);
  else return make_float2(__uint_as_float(w[0]), __uint_as_float(w[kW - 1]));
}
__device__ __forceinline__ void sts_v2(float* p, float a, float b) {
  asm volatile("st.volatile.shared.v2.f32 [%0], {%1, %2};" ::"r"(smem_addr(p)), "f"(a), "f"(b) : "memory");
}

// Two consecutive values of a 16-bit / fp32 row at element 2 * j, as fp32.
template <typename T>
__device__ __forceinline__ float2 ld_pair(const T* row, int j) {
  if constexpr (sizeof(T) == 2) return scan4::unpack2<T>(reinterpret_cast<const unsigned*>(row)[j]);
  else return reinterpret_cast<const float2*>(row)[j];
}

// An opaque copy of v: the compiler cannot hoist what is computed from it out of the tile loop. The staging
// below derives ~30 loop-invariant addresses from (tid, b, head); hoisted, they cost the registers the adjoint
// needs (ptxas: 32 bytes of spills at 255 registers); recomputed per tile, they cost a few integer ops.
__device__ __forceinline__ int opaque(int v) {
  int r;
  asm volatile("mov.b32 %0, %1;" : "=r"(r) : "r"(v));
  return r;
}

// Issues the copies of the tile starting at t0 into r: the forward's tile (x, B, C, z, dt_low by the shared
// scan_stage.cuh copies; seq_idx) plus dy, the 3 x rows before the tile (conv halo) and their document ids. Rows
// past the sequence end are zero-filled (16-byte cp.async when the host found the rows aligned, plain loads else).
template <typename T>
__device__ __forceinline__ void stage_bwd(const MixerScanParams& p, RawB4<T>& r, int b_, int head_, int group_, int t0_) {
  constexpr int kVec = 16 / sizeof(T), kCPR = kN / kVec;
  const int tid = opaque(threadIdx.x), b = opaque(b_), head = opaque(head_), group = opaque(group_), t0 = opaque(t0_);
  const T* zx = static_cast<const T*>(p.zxbc) + (int64_t)b * p.zxbc_batch_stride;
  const int col_x = p.d_inner + group * kN, col_B = p.d_inner + p.d_xb + group * kN;
  const int col_C = p.d_inner + 2 * p.d_xb + head * kN, col_z = head * kN;
  const T* dyp = static_cast<const T*>(p.dy) + (int64_t)b * p.seqlen * p.d_inner + head * kN;
  if (p.zxbc_vec16) {
    stage_zxbc_vec16<T, kNT, kR>(p, r.f, zx, tid, col_x, col_B, col_C, col_z, t0);
    if (tid < 3 * kCPR) {  // halo rows; positions < 0 are filled from the initial conv state in phase A
      const int row = tid / kCPR, part = tid % kCPR, pos = t0 - 3 + row;
      const bool ok = pos >= 0;
      cp_async16(&r.xh[row][part * kVec], ok ? zx + (int64_t)pos * p.zxbc_row_stride + col_x + part * kVec : zx, ok);
    }
  } else {
    stage_zxbc_plain<T, kNT, kR>(p, r.f, zx, tid, col_x, col_B, col_C, col_z, t0);
    if (tid < 3 * kN) {
      const int row = tid / kN, c = tid % kN, pos = t0 - 3 + row;
      r.xh[row][c] = pos >= 0 ? zx[(int64_t)pos * p.zxbc_row_stride + col_x + c] : from_f<T>(0.f);
    }
  }
  stage_dt<T, kNT, kR>(p, r.f, b, tid, t0);
  stage_rows<T, kNT, kN>(r.dy, dyp, p.d_inner, kN, p.dy_vec16, p, tid, t0);
  if (p.seq_idx != nullptr) {
    const int* sq = p.seq_idx + (int64_t)b * p.seqlen;
    if (tid < kChunk) {
      cp_async4(&r.f.seq[tid], sq + min(t0 + tid, p.seqlen - 1));  // past the end: the last id (inert tokens)
    } else if (tid < kChunk + 3) {
      cp_async4(&r.seqh[tid - kChunk], sq + max(t0 - 3 + (tid - kChunk), 0));  // before 0: document of token 0
    }
  }
}

// kBCf (APRIEL_SCAN_BWD_BC=f32, for A/B): B / C converted once per tile to fp32 (one 16-byte load per token gives a
// lane its 2 B and 2 C values, no unpacking in the loops); measured 2-3 % slower than reading the raw tile (the
// default: fewer shared-memory wavefronts, and the conversion's stores conflict), so not the default.
template <typename T, bool kBCf>
__global__ void __launch_bounds__(kNT, 2) mixer_scan_bwd4_kernel(MixerScanParams p) {
  constexpr int K = kK, NT = kNT, NS = kNS, TPT = kTPT;
  constexpr bool kMma = sizeof(T) == 2;
  constexpr int kKSteps = kR / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  using Sm = SmemB4<T, kBCf>;
  Sm& sm = *reinterpret_cast<Sm*>(smem_raw);
  const int head = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int group = head / p.heads_per_group, c0 = head * kN;
  const int D = p.d_inner, L = p.seqlen, R = p.dt_rank, W = p.width, hw = W - 1;
  const int n_tiles = p.n_chunks;
  const bool has_seq = p.seq_idx != nullptr;
  const int64_t rowZ = 2 * (int64_t)D + 2 * p.d_xb;

  stage_bwd<T>(p, sm.raw[(n_tiles - 1) & 1], b, head, group, (n_tiles - 1) * kChunk);
  cp_async_commit();

  // Prep / store mapping: channel pch, tokens pq * TPT .. + TPT - 1 (prep) or pq + 8 k (stores).
  const int pch = tid % kN, pq = tid / kN, pc = c0 + pch;
  // Per-channel constants live in smem (registers are the limit: hs[32][2] plus the adjoint's accumulators).
  if (tid < kN) {
    const int wch = p.repeat_before_conv ? pc : group * kN + pch;  // tid == pch here
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // right-aligned taps: tap 3 multiplies the current token for every width
      const int src = i - (4 - W);
      sm.cw[tid][i] = src >= 0 ? p.conv_w[wch * W + src] : 0.f;
    }
    sm.cbd[tid] = make_float2(p.conv_b != nullptr ? p.conv_b[wch] : 0.f, 2.f * p.dt_b[pc]);
  }
  if constexpr (kMma) {  // B fragments of W^T, as the forward v4 builds them (same rounding to T)
    if (warp == 0) {
      const int g = lane / 4, q = lane % 4;
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int k = ks * 16 + hf * 8 + 2 * q;
            const int64_t row = (int64_t)(c0 + n * 8 + g) * R;
            sm.wfrag[lane][(n * kKSteps + ks) * 2 + hf] =
                scan4::MmaOp<T>::pack(k < R ? p.dt_w[row + k] : 0.f, k + 1 < R ? p.dt_w[row + k + 1] : 0.f);
          }
    }
  } else {
    for (int i = tid; i < kN * kR; i += NT) {
      const int ch = i / kR, col = i % kR;
      sm.dtw[ch][col] = col < R ? p.dt_w[(int64_t)(c0 + ch) * R + col] : 0.f;
    }
  }

  // Scan mapping: channel sch, lane j, states j NS + s.
  const int sch = tid / K, j = tid % K, cs = c0 + sch;
  float An[NS], A2[NS], carry[NS], dA[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const int n = j * NS + s;
    An[s] = -__expf(p.A_log[cs * kN + n]);
    A2[s] = An[s] * kLog2e;
    carry[s] = p.dfinal_ssm != nullptr ? p.dfinal_ssm[((int64_t)b * D + cs) * kN + n] : 0.f;
    dA[s] = 0.f;
  }
  const float Dc = p.Dskip[cs];
  float accD = 0.f, accCB = 0.f, accW[4] = {0.f, 0.f, 0.f, 0.f};
  const float* ck = p.ckpt_in + ((int64_t)b * n_tiles * D + cs) * kN + j * NS;  // + tile * D * kN
  float2 h0n = *reinterpret_cast<const float2*>(ck + (int64_t)(n_tiles - 1) * D * kN);
  T* dzx = static_cast<T*>(p.dzxbc) + (int64_t)b * L * rowZ;

  for (int tile = n_tiles - 1; tile >= 0; --tile) {
    const int t0 = tile * kChunk, par = tile & 1, Tv = min(kChunk, L - t0);
    const RawB4<T>& r = sm.raw[par];
    const float h0[NS] = {h0n.x, h0n.y};
    if (tile > 0) h0n = *reinterpret_cast<const float2*>(ck + (int64_t)(tile - 1) * D * kN);
    cp_async_wait_all();
    __syncthreads();  // S1: this tile's copies visible; every reader of the previous tile's smem is done
    if (tile > 0) {
      stage_bwd<T>(p, sm.raw[par ^ 1], b, head, group, t0 - kChunk);
      cp_async_commit();
    }

    // A: x -> fp32 (rows 3..34), halo rows 0..2 (initial conv state before position 0), document ids, dt_proj.
    {
      const int q4 = tid;  // kChunk * kN / 4 == NT quads
      scan4::cvt4<T>(&r.f.x[0][0] + q4 * 4, &sm.xf[3 + q4 / 4][(q4 % 4) * 4]);
      if (tid < 3 * kN) {
        const int row = tid / kN, ch = tid % kN;
        float v;
        if (t0 > 0) {
          v = to_f(r.xh[row][ch]);
        } else {
          const int kk = hw + row - 3;  // index into the last W-1 entries of the conv state
          v = (p.init_conv != nullptr && kk >= 0) ? p.init_conv[((int64_t)b * p.d_xb + group * kN + ch) * hw + kk] : 0.f;
        }
        sm.xf[row][ch] = v;
      }
      if constexpr (kBCf) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {  // 256 quads (B, C) x 32 tokens x 4 states; quad q = states 4q .. 4q + 3
          const int idx = tid + k * NT, which = idx / (kChunk * 4), t = (idx / 4) % kChunk, q = idx % 4;
          const T* src = which == 0 ? &r.f.B[t][4 * q] : &r.f.C[t][4 * q];
          float v[4];
          if constexpr (sizeof(T) == 2) {
            const uint2 w = *reinterpret_cast<const uint2*>(src);
            const float2 lo = scan4::unpack2<T>(w.x), hi = scan4::unpack2<T>(w.y);
            v[0] = lo.x; v[1] = lo.y; v[2] = hi.x; v[3] = hi.y;
          } else {
            const float4 w = *reinterpret_cast<const float4*>(src);
            v[0] = w.x; v[1] = w.y; v[2] = w.z; v[3] = w.w;
          }
          // states 4q, 4q+1 -> lane 2q; 4q+2, 4q+3 -> lane 2q+1; B at +0, C at +2
          *reinterpret_cast<float2*>(&sm.BCf[t][(2 * q) * 4 + 2 * which]) = make_float2(v[0], v[1]);
          *reinterpret_cast<float2*>(&sm.BCf[t][(2 * q + 1) * 4 + 2 * which]) = make_float2(v[2], v[3]);
        }
      }
      if (tid < kChunk) sm.seqf[par][3 + tid] = has_seq ? r.f.seq[tid] : 0;
      else if (tid < kChunk + 3) sm.seqf[par][tid - kChunk] = !has_seq ? 0 : t0 > 0 ? r.seqh[tid - kChunk] : r.f.seq[0];
      if constexpr (kMma) {
        const int g = lane / 4, q = lane % 4;
        const int m = warp & 1, n = warp >> 1;  // 4 warps: one (m-tile, n-tile) pair of the 32 x 16 output each
        float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) {
          unsigned a[4];
          scan4::dt_a_fragment(r.f, m, ks, lane, R, a);
          const unsigned bf[2] = {sm.wfrag[lane][(n * kKSteps + ks) * 2], sm.wfrag[lane][(n * kKSteps + ks) * 2 + 1]};
          scan4::MmaOp<T>::run(d, a, bf);
        }
        *reinterpret_cast<float2*>(&sm.dtp[m * 16 + g][n * 8 + 2 * q]) = make_float2(d[0], d[1]);
        *reinterpret_cast<float2*>(&sm.dtp[m * 16 + g + 8][n * 8 + 2 * q]) = make_float2(d[2], d[3]);
      }
    }
    __syncthreads();  // S2

    // B: prep of TPT consecutive tokens of channel pch (xf row i + 3 holds token i).
    {
      const int tb = pq * TPT;
      const float w[4] = {sm.cw[pch][0], sm.cw[pch][1], sm.cw[pch][2], sm.cw[pch][3]};
      const float2 cbd = sm.cbd[pch];
      const float cb = cbd.x, dtb2 = cbd.y;
      float xw[TPT + 3];
      int sw[TPT + 3];
#pragma unroll
      for (int k = 0; k < TPT + 3; ++k) {
        xw[k] = sm.xf[tb + k][pch];
        sw[k] = sm.seqf[par][tb + k];
      }
#pragma unroll
      for (int i = 0; i < TPT; ++i) {
        const int t = tb + i;
        float cv = cb;
#pragma unroll
        for (int k = 0; k < 4; ++k) cv = fmaf(w[k], sw[i + k] == sw[i + 3] ? xw[i + k] : 0.f, cv);
        const float sc = sigmoid_fast(cv), u = cv * sc;
        float dp = dtb2;
        if constexpr (kMma) {
          dp += sm.dtp[t][pch];
        } else {  // the forward v4's CUDA-core dot, same order
          const float* dtrow = reinterpret_cast<const float*>(&r.f.dt[t][0]);
#pragma unroll
          for (int c = 0; c < kR; c += 4) {
            if (c < R) {
              const float4 v = *reinterpret_cast<const float4*>(dtrow + c);
              const float4 wv = *reinterpret_cast<const float4*>(&sm.dtw[pch][c]);
              dp = fmaf(wv.x, c < R ? v.x : 0.f,
                        fmaf(wv.y, c + 1 < R ? v.y : 0.f,
                             fmaf(wv.z, c + 2 < R ? v.z : 0.f, fmaf(wv.w, c + 3 < R ? v.w : 0.f, dp))));
            }
          }
        }
        const float delta = softplus_fast(dp);
        const bool start = sw[i + 2] != sw[i + 3];  // first token of a document: no decay from the previous one
        const float zz = to_f(r.f.z[t][pch]), sz = sigmoid_fast(zz), dyv = to_f(r.dy[t][pch]);
        const float dys = dyv * zz * sz;
        sm.e4[t][pch] = t < Tv ? make_float4(delta, delta * u, start ? -__int_as_float(0x7f800000) : 0.f, dys)
                               : make_float4(0.f, 0.f, 0.f, 0.f);
        // the derivatives the epilogue needs, computed here where the arguments are at hand
        sm.pe[t][pch] = make_float4(u, sc * (1.f + cv * (1.f - sc)), dp > 20.f ? 1.f : sigmoid_fast(dp),
                                    dyv * sz * (1.f + zz * (1.f - sz)));
      }
    }
    __syncthreads();  // S2b

    // C: recompute the tile's states (hs) and the readout C h (for dz), reduce-scattered over the K lanes per
    // part of kH tokens (short accumulator arrays: registers). Lane j then owns tokens kH hf + base + i (i < kQ).
    constexpr int kParts = APRIEL_SCAN_BWD4_PARTS, kH = kChunk / kParts, kQ = kH / K;
    static_assert(kQ >= 1, "a part holds at least K tokens");
    float hs[kChunk][NS];
    float yv[kParts][kQ];
    int base = 0;
    {
      float h[NS] = {h0[0], h0[1]};
#pragma unroll
      for (int hf = 0; hf < kParts; ++hf) {
        float acc[kH];
#pragma unroll
        for (int tt = 0; tt < kH; ++tt) {
          const int t = hf * kH + tt;
          const float4 e = sm.e4[t][sch];
          float Bs[2], Cs[2];
          if constexpr (kBCf) {
            const float4 bc = *reinterpret_cast<const float4*>(&sm.BCf[t][4 * j]);
            Bs[0] = bc.x; Bs[1] = bc.y; Cs[0] = bc.z; Cs[1] = bc.w;
          } else {
            const float2 Bv = ld_pair<T>(&r.f.B[t][0], j), Cv = ld_pair<T>(&r.f.C[t][0], j);
            Bs[0] = Bv.x; Bs[1] = Bv.y; Cs[0] = Cv.x; Cs[1] = Cv.y;
          }
          float part = 0.f;
#pragma unroll
          for (int s = 0; s < NS; ++s) {
            h[s] = fmaf(ex2(fmaf(e.x, A2[s], e.z)), h[s], e.y * Bs[s]);
            hs[t][s] = h[s];
            part = fmaf(Cs[s], h[s], part);
          }
          acc[tt] = part;
        }
        reduce_scatter<K, kH>(acc, j, base);
#pragma unroll
        for (int i = 0; i < kQ; ++i) yv[hf][i] = acc[i];
      }
    }

    // Adjoint, tokens in reverse. accU: sum_s G B (du / delta, and d delta's u term); accP: sum_s G a h_{t-1} A.
    // The operands of token t are loaded kPF tokens ahead with volatile shared loads, ordered against the
    // volatile stores of the dB / dC contributions: unconstrained, ptxas hoisted the loads (and the ex2 built
    // on them) of a whole part ahead of the carry chain and spilled.
    constexpr int kPF = APRIEL_SCAN_BWD4_PF, kWB = sizeof(T) == 2 ? 1 : 2;
    float psum[kParts][kQ], usum[kParts][kQ];
    float4 eq[kPF + 1];
    unsigned bq[kPF + 1][kBCf ? 1 : kWB], cq[kPF + 1][kBCf ? 1 : kWB];
    float4 bcq[kBCf ? kPF + 1 : 1];
    auto load_tok = [&](int t, int slot) {
      eq[slot] = lds_v4(&sm.e4[t][sch]);
      if constexpr (kBCf) {
        bcq[slot] = lds_v4(reinterpret_cast<const float4*>(&sm.BCf[t][4 * j]));
      } else {
        lds_words<kWB>(&r.f.B[t][j * NS], bq[slot]);
        lds_words<kWB>(&r.f.C[t][j * NS], cq[slot]);
      }
    };
#pragma unroll
    for (int t = kChunk - 1; t >= kChunk - kPF; --t) load_tok(t, t % (kPF + 1));
    float accP[kH], accU[kH];
#pragma unroll
    for (int t = kChunk - 1; t >= 0; --t) {
      if (t - kPF >= 0) load_tok(t - kPF, (t - kPF) % (kPF + 1));
      const int slot = t % (kPF + 1), tt = t % kH;
      const float4 e = eq[slot];
      float Bs[2], Cs[2];
      if constexpr (kBCf) {
        Bs[0] = bcq[slot].x; Bs[1] = bcq[slot].y; Cs[0] = bcq[slot].z; Cs[1] = bcq[slot].w;
      } else {
        const float2 Bv = words_pair<T>(bq[slot]), Cv = words_pair<T>(cq[slot]);
        Bs[0] = Bv.x; Bs[1] = Bv.y; Cs[0] = Cv.x; Cs[1] = Cv.y;
      }
      float pp = 0.f, pu = 0.f, rb[NS], rc[NS];
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        const float a = ex2(fmaf(e.x, A2[s], e.z));
        const float Gs = fmaf(Cs[s], e.w, carry[s]);  // dL/dh_t
        const float hp = t > 0 ? hs[t > 0 ? t - 1 : 0][s] : h0[s];
        const float ga = Gs * a;  // the carry to token t-1, and d/d(decay) up to h_{t-1}
        const float q = ga * hp;
        pu = fmaf(Gs, Bs[s], pu);
        pp = fmaf(q, An[s], pp);
        dA[s] = fmaf(q, e.x, dA[s]);
        rb[s] = Gs * e.y;
        rc[s] = e.w * hs[t][s];
        carry[s] = ga;
      }
      accP[tt] = pp;
      accU[tt] = pu;
      sts_v2(&sm.rB[t][sch * kN + j * NS], rb[0], rb[1]);
      sts_v2(&sm.rC[t][sch * kN + j * NS], rc[0], rc[1]);
      if (tt == 0) {
        reduce_scatter<K, kH>(accP, j, base);
        reduce_scatter<K, kH>(accU, j, base);
#pragma unroll
        for (int i = 0; i < kQ; ++i) {
          psum[t / kH][i] = accP[i];
          usum[t / kH][i] = accU[i];
        }
      }
    }

    // Epilogue per (channel sch, token t) owned after the reduce-scatter. Volatile loads: kept after the
    // adjoint's volatile stores (hoisted into the adjoint, these loads made ptxas spill).
    const volatile int* sq = sm.seqf[par];
    const volatile float* xq = &sm.xf[0][0];
#pragma unroll
    for (int hf = 0; hf < kParts; ++hf) {
#pragma unroll
      for (int i = 0; i < kQ; ++i) {
        const int t = hf * kH + base + i;
        // (delta, delta u, offset, dys), (u, silu'(cv), softplus'(v), dz / y)
        const float4 e = lds_v4(&sm.e4[t][sch]), x = lds_v4(&sm.pe[t][sch]);
        const float u = x.x;
        const float yfull = yv[hf][i] + Dc * u;
        const float pd = fmaf(u, usum[hf][i], psum[hf][i]);  // d delta
        sts_v2(reinterpret_cast<float*>(&sm.pe[t][sch]), yfull * x.w, pd * x.z);
        const float dut = fmaf(e.x, usum[hf][i], e.w * Dc);  // du (scan) + D skip
        const float dco = t < Tv ? dut * x.y : 0.f;
        sm.dco[par][t][sch] = dco;
        if (t < Tv) {
          accD = fmaf(e.w, u, accD);
          accCB += dco;
          const int cur = sq[t + 3];
#pragma unroll
          for (int k = 0; k < 4; ++k)
            if (sq[t + k] == cur) accW[k] = fmaf(dco, xq[(t + k) * kRS + sch], accW[k]);
        }
      }
    }
    __syncthreads();  // S3

    // D1: dB (partial per head) / dC (complete per head): sums over the head's 16 channels, fixed order
    // (head_reduce.cuh, shared with sscan_bwd2). The store captures by value: the loop-invariant bases are then
    // formed before the loop (SASS, bf16: this loop 143 -> 139 instructions, the tile loop 4386 -> 4332; by
    // reference both stayed as they were with the inline loop).
    const int64_t row0 = (int64_t)b * L + t0;
    head_reduce_bc<kChunk, kN, kN, Sm::kRB, NT>(sm.rB, sm.rC, Tv, tid, [=](int which, int t, int q, float4 sum) {
      if (which == 0) {
        *reinterpret_cast<float4*>(p.dB_part + ((row0 + t) * (D / kN) + head) * kN + 4 * q) = sum;
      } else {
        T* dst = dzx + (int64_t)(t0 + t) * rowZ + D + 2 * p.d_xb + c0 + 4 * q;
        dst[0] = from_f<T>(sum.x); dst[1] = from_f<T>(sum.y); dst[2] = from_f<T>(sum.z); dst[3] = from_f<T>(sum.w);
      }
    });
    // D2: per (channel pch, token t): transposed conv (taps into other documents masked), dz, ddt_pre.
    const float w[4] = {sm.cw[pch][0], sm.cw[pch][1], sm.cw[pch][2], sm.cw[pch][3]};
#pragma unroll
    for (int k = 0; k < TPT; ++k) {
      const int t = pq + k * (NT / kN);
      if (t < Tv) {
        const int cur = sm.seqf[par][t + 3];
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = t + 3 - i;  // output token using this input at tap i
          if (row < kChunk) {
            if (row < Tv && sm.seqf[par][row + 3] == cur) acc = fmaf(w[i], sm.dco[par][row][pch], acc);
          } else if (tile + 1 < n_tiles && sm.seqf[par ^ 1][row - kChunk + 3] == cur) {
            acc = fmaf(w[i], sm.dco[par ^ 1][row - kChunk][pch], acc);  // 0 past the next tile's end
          }
        }
        const float2 o = *reinterpret_cast<const float2*>(&sm.pe[t][pch]);  // (dz, ddt_pre)
        p.dx_part[(row0 + t) * D + c0 + pch] = acc;
        dzx[(int64_t)(t0 + t) * rowZ + c0 + pch] = from_f<T>(o.x);
        p.ddt_pre[(row0 + t) * D + c0 + pch] = o.y;
      }
    }
    if (tile == 0 && tid < kN * hw) {
      // gradient of the initial conv state: positions -hw..-1 (document of token 0)
      const int ch = tid / hw, kk = tid % hw, pos = kk - hw;
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = pos + 3 - i;
        if (row >= 0 && row < Tv && sm.seqf[0][row + 3] == sm.seqf[0][2]) acc = fmaf(sm.cw[ch][i], sm.dco[0][row][ch], acc);
      }
      p.dinit_conv_part[((int64_t)b * D + c0 + ch) * hw + kk] = acc;
    }
  }

  // Outputs of the whole sequence: dA_log = A sum(...) per state, the carry past token 0, channel sums over the
  // K lanes (butterfly: a fixed order, deterministic).
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const int64_t o = ((int64_t)b * D + cs) * kN + j * NS + s;
    p.dA_log_part[o] = dA[s] * An[s];
    p.dinit_ssm[o] = carry[s];
  }
#pragma unroll
  for (int off = 1; off < K; off <<= 1) {
    accD += __shfl_xor_sync(0xffffffffu, accD, off);
    accCB += __shfl_xor_sync(0xffffffffu, accCB, off);
#pragma unroll
    for (int i = 0; i < 4; ++i) accW[i] += __shfl_xor_sync(0xffffffffu, accW[i], off);
  }
  if (j == 0) {
    const int64_t c = (int64_t)b * D + cs;
    p.dD_part[c] = accD;
    p.dconv_b_part[c] = accCB;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int src = i - (4 - W);  // right-aligned taps back to weight columns
      if (src >= 0) p.dconv_w_part[c * W + src] = accW[i];
    }
  }
}

template <typename T, bool kBCf>
void launch(const MixerScanParams& p, void* stream) {
  constexpr int smem = sizeof(SmemB4<T, kBCf>);
  auto kernel = mixer_scan_bwd4_kernel<T, kBCf>;
  static bool configured = false;  // per instantiation; a race here only repeats an idempotent call
  if (!configured) {
    APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           (int)cudaSharedmemCarveoutMaxShared));
    configured = true;
  }
  const dim3 grid(p.d_inner / kN, p.batch);
  kernel<<<grid, kNT, smem, static_cast<cudaStream_t>(stream)>>>(p);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace scan4b

template <typename T>
void launch_mixer_scan_bwd4(const MixerScanParams& p, void* stream) {
  if (p.bwd_f32_bc) scan4b::launch<T, true>(p, stream);
  else scan4b::launch<T, false>(p, stream);
}

}  // namespace apriel
