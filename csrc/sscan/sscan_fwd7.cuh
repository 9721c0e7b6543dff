// Forward of the generic (mamba-compatible) selective scan on the mixer scan's v7 machinery (session 25): the input
// product du (x) B and the readout C . h on tensor cores, one WARP per 16 channels (a "head"), 16-bit activations.
//
// Why: v2 (sscan_fwd2.cuh, session 2) is the mixer scan's v4 design (K lanes per channel, the readout
// reduce-scattered); at batch 8 the mixer's v7 does more work per token (conv, dt_proj) in 1.04 ms where v2 took
// 1.79. This kernel runs v7's scan core itself - scan7::scan_half and scan7::gate_row (mixer_scan_fwd7.cuh, the
// design and its measurements are there). What differs from the mixer's v7 is the staging (cp.async of 14 slots of
// 16 rows x 32 tokens: u, delta, z of each warp's 16 channels, B, C) and the prep per (channel, token): no conv and
// no dt_proj - delta = softplus(delta + delta_bias) (or without softplus), du = tf32(delta u), the gate silu(z) (1
// without z) and D u silu(z) - as v2 computes them (sscan::softplus_v2 / sigmoid_fast, or v1's precise forms with
// APRIEL_SSCAN_SOFTPLUS=precise).
// Block = 4 warps = 64 consecutive channels of one sequence, which one B group and one C group must hold (the host:
// d_state 16, d_inner % 64 == 0, channels per B / C group a multiple of 64). Per 32-token tile: a block barrier (the
// tile's copies are visible, the previous tile's readers are done), the next tile's copies, the tile's B-operand
// table by the block, a second barrier; then each warp alone per 16-token half: prep -> du / gt and C words (cop);
// __syncwarp; scan_half; the gated y rows. The state checkpoints (before every tile) and the final state have v2's
// layout, so the backward v2 consumes them unchanged.
// Two stagings (Slot): kFast - every activation in one orientation with aligned rows (mamba's channel-major layout,
// or token-major): unpadded slots, 55.8 KB of shared memory, 4 blocks per SM as the mixer's v7, 4 values per prep
// load; otherwise v2's stage_tensor and padded slots (mixed orientations, plain loads where 16-byte copies are not
// legal), 3 blocks per SM - correct, slower than v2 (the host runs it only when forced). Measurements: docs/notes/sscan.md "Forward v7".
// Not handled (the host runs v2): fp32 activations, packed documents (seq_idx), other shapes.
#pragma once
#include "sscan_fwd2.cuh"                // sscan2:: stage_tensor, Geom, cp.async; sscan:: softplus_v2, sigmoids
#include "../scan/mixer_scan_fwd7.cuh"  // scan7:: scan_half, gate_row, tf32_rna, kHalf
#include "sscan_prepass.cuh"             // sscanpp:: the split pre-passes' groups, copies and fold

namespace apriel {
namespace sscan7 {

using scan7::kHalf;
using sscan::kT;
constexpr int kHeads = 4;                // warps (16-channel heads) per block
constexpr int kThreads = 32 * kHeads;
constexpr int kN = 16;
constexpr int kSlots = 3 * kHeads + 2;   // raw slots per tile: u, delta, z of each head, then B, C
enum { kSlotU = 0, kSlotDelta = kHeads, kSlotZ = 2 * kHeads, kSlotB = 3 * kHeads, kSlotC = 3 * kHeads + 1 };

// kFast (every activation in one orientation with 16-byte copies, aligned rows): unpadded slots of 16 x kT values.
// Token-fast (with kBT: mamba's channel-major layout) their 16-byte pieces are XOR-swizzled by row (piece ^ (row / 2)
// % 4), so that the prep's 8-byte loads (8 rows, 4 token quads per warp) spread over the banks; token-major (without
// kBT) they are kT rows of 16 values, as the mixer's raw tiles. Else v2's slot (either orientation, padded).
template <typename T, bool kFast>
struct Slot {
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kElems = kFast ? 16 * kT : sscan2::Geom<T>::kSlot;
  // element (row r, token t) of a token-fast slot
  static __device__ __forceinline__ int tf(int r, int t) {
    if constexpr (kFast) return r * kT + (((t / kVec) ^ ((r >> 1) & 3)) * kVec) + t % kVec;
    else return sscan2::Geom<T>::tf(r, t);
  }
};
template <typename T, bool kFast>
struct Smem {
  alignas(16) T raw[2][kSlots][Slot<T, kFast>::kElems];  // by tile parity
  alignas(16) float4 du[kHeads][kHalf][9];                // the mixer v7's tables (mixer_scan_fwd7.cuh Smem7)
  alignas(16) float4 gt[kHeads][kHalf][9];
  alignas(16) uint4 cop[kHeads][kHalf / 2][4];
  alignas(16) float yf[kHeads][kHalf][kN];
  alignas(16) float4 bop[kT / 2][9];  // the B operand of the tile per token pair (entry 8: zeros), the block's
  const T* src[kSlots];               // kFast: each slot's first element of this block (sequence, channels)
  int64_t src_stride[kSlots];         // and the stride of its copied rows (channels / states, or tokens)
};
// 4 blocks per SM (as the mixer's v7: a b8 grid at d_inner 4096 is one wave of them) with kFast's unpadded slots;
// v2's padded slots fit 3.
template <bool kFast>
constexpr int kBlocksPerSm = kFast ? 4 : 3;
static_assert(sizeof(Smem<__nv_bfloat16, true>) + 1024 <= 233472 / kBlocksPerSm<true>, "4 blocks per SM must fit");
static_assert(sizeof(Smem<__nv_bfloat16, false>) + 1024 <= 233472 / kBlocksPerSm<false>, "3 blocks per SM must fit");

// Element (row r = channel or state, token t) of a staged slot: token-fast (tf) or token-major.
template <typename T, bool kFast>
__device__ __forceinline__ T at(const T* slot, int r, int t, bool tf) {
  return slot[tf ? Slot<T, kFast>::tf(r, t) : t * 16 + r];
}
// The 32-bit word of tokens t, t + 1 (t even) of row r of a token-fast slot.
template <typename T, bool kFast>
__device__ __forceinline__ unsigned pair_word(const T* slot, int r, int t) {
  return *reinterpret_cast<const unsigned*>(slot + Slot<T, kFast>::tf(r, t));
}

// Where slot s (u, delta, z of the block's 4 x 16 channels, then B, C) comes from: its tensor's first element of this
// block (sequence b, channels c0 ..), its token / row strides, and the tensor's bit in v2_tfast / v2_vec.
struct SlotSrc {
  const void* ptr;
  int64_t ls, cs;
  int bit;
};
template <typename T>
__device__ __forceinline__ SlotSrc slot_source(const SScanParams& p, int b, int c0, int s) {
  if (s < kSlotB) {
    const int kind = s / kHeads, c = c0 + 16 * (s % kHeads);
    if (kind == 0) {
      const int src_u = sscan2::u_column16(p, c);
      return {static_cast<const T*>(p.u) + (int64_t)b * p.u_sb + (int64_t)src_u * p.u_sc, p.u_sl, p.u_sc, kV2U};
    }
    if (kind == 1)
      return {static_cast<const T*>(p.dl) + (int64_t)b * p.dl_sb + (int64_t)c * p.dl_sc, p.dl_sl, p.dl_sc, kV2Delta};
    return {static_cast<const T*>(p.z) + (int64_t)b * p.z_sb + (int64_t)c * p.z_sc, p.z_sl, p.z_sc, kV2Z};
  }
  if (s == kSlotB) {
    const T* B = static_cast<const T*>(p.B) + (int64_t)b * p.B_sb + (int64_t)(c0 / p.b_cpg) * p.B_sg;
    return {B, p.B_sl, p.B_sn, kV2B};
  }
  const T* C = static_cast<const T*>(p.C) + (int64_t)b * p.C_sb + (int64_t)(c0 / p.c_cpg) * p.C_sg;
  return {C, p.C_sl, p.C_sn, kV2C};
}

// kFast staging of the tile at t0 into raw (kNSlots slots of 16 x kT values; no commit): copy tid + kThreads k is
// 16-byte piece tid % kPR of row (tid % 64) / kPR of slot 2k + tid / 64 (token-fast: 16 rows of kPR = 4 pieces;
// token-major: 32 token rows of 2). src / stride: each slot's first element and the stride of its copied rows. The
// backward v7 adds the 4 warps' dy slots after the forward's 14.
template <typename T, bool kBT, int kNSlots = kSlots>
__device__ __forceinline__ void stage_fast(T (*raw)[16 * kT], const T* const* src_of, const int64_t* stride_of,
                                           int t0, int L, int tid, bool has_z) {
  using S = Slot<T, true>;
  constexpr int kVec = S::kVec, kPerSlot = 16 * kT / kVec;
  static_assert(kThreads == 2 * kPerSlot && kNSlots % 2 == 0, "two slots per step");
  int dst, pos, n, row;  // (row: the source row of this copy, offset by pos along the other dimension)
  if constexpr (kBT) {
    constexpr int kPR = kT / kVec;
    const int part = tid % kPR;
    row = (tid % kPerSlot) / kPR, pos = t0 + part * kVec, dst = S::tf(row, part * kVec);
    n = min(max(L - pos, 0), kVec);
  } else {
    constexpr int kPR = 16 / kVec;
    const int part = tid % kPR, t = (tid % kPerSlot) / kPR;
    row = t0 + t, pos = part * kVec, dst = t * 16 + part * kVec;
    n = row < L ? kVec : 0;
  }
#pragma unroll
  for (int k = 0; k < kNSlots / 2; ++k) {
    const int s = 2 * k + tid / kPerSlot;
    if (!has_z && s >= kSlotZ && s < kSlotB) continue;
    const T* src = src_of[s];
    sscan2::cp_async16(raw[s] + dst, n > 0 ? src + row * stride_of[s] + pos : src, n * (int)sizeof(T));
  }
}

// The B operand entry of thread tid for the tile (token pair tid / 8, state bg = tid % 8): (B_t[bg], B_t[8 + bg],
// B_t+1[bg], B_t+1[8 + bg]) from the staged B slot (kBT: token-fast, else token-major).
template <typename T, bool kFast, bool kBT>
__device__ __forceinline__ float4 b_operand(const T* rB, int tid) {
  const int pr = tid / 8, bg = tid % 8, t = 2 * pr;
  if constexpr (kBT) {  // a state's two tokens in one word
    const unsigned w0 = pair_word<T, kFast>(rB, bg, t), w1 = pair_word<T, kFast>(rB, bg + 8, t);
    return make_float4(sscan2::half_of<T>(w0, false), sscan2::half_of<T>(w1, false), sscan2::half_of<T>(w0, true),
                       sscan2::half_of<T>(w1, true));
  } else {
    return make_float4(sscan::to_f(rB[t * 16 + bg]), sscan::to_f(rB[t * 16 + bg + 8]),
                       sscan::to_f(rB[(t + 1) * 16 + bg]), sscan::to_f(rB[(t + 1) * 16 + bg + 8]));
  }
}

// delta from its input v (+ bias): softplus with the MUFU forms (kFastPrep: the default call), else per the flags.
// The backward v7 and both pre-passes of the sequence split compute it as this kernel's prep does.
template <bool kFastPrep>
__device__ __forceinline__ float delta_of(const SScanParams& p, float v) {
  if constexpr (kFastPrep) return softplus_fast(v);
  else return p.softplus ? sscan::softplus_v2(v, p.fast_prep) : v;
}
// sigmoid(z) of the gate silu(z) = z sigmoid(z).
template <bool kFastPrep>
__device__ __forceinline__ float gate_sigmoid(const SScanParams& p, float zz) {
  return kFastPrep || p.fast_prep ? sscan::sigmoid_fast(zz) : sscan::sigmoidf_(zz);
}

// kBT: B / C staged token-fast (the host keeps them in one orientation, as v2's kBT). kFast: see Slot; its prep
// reads 4 values per 8-byte load - 4 tokens of a channel (token-fast) or 4 channels of a token (token-major) - where
// the generic prep reads one 16-bit value per item.
// kFastPrep: softplus on delta with the MUFU forms (the default call: delta_softplus, APRIEL_SSCAN_SOFTPLUS unset),
// compiled without the precise forms' code; else both per the runtime flags.
template <typename T, bool kBT, bool kFast, bool kFastPrep>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<kFast>) sscan_fwd7_kernel(SScanParams p) {
  static_assert(sizeof(T) == 2, "16-bit activations");
  using S = Slot<T, kFast>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem<T, kFast>& sm = *reinterpret_cast<Smem<T, kFast>*>(smem_raw);
  const int tid = threadIdx.x, lane = tid % 32, w = tid / 32, g = lane / 4, q = lane % 4;
  const int c0 = blockIdx.x * (kHeads * 16), hc0 = c0 + 16 * w;  // block / warp first channel
  const int segs = p.fwd_segments, b = blockIdx.y / segs, seg = blockIdx.y % segs;  // (the sequence split)
  const int D = p.dim, L = p.seqlen, n_tiles = p.n_chunks;
  const int tile_first = seg * p.fwd_seg_tiles, tile_end = min(n_tiles, tile_first + p.fwd_seg_tiles);
  const bool has_z = p.z != nullptr;
  auto bit = [&](unsigned m, int i) { return ((m >> i) & 1u) != 0; };
  const bool tf_u = bit(p.v2_tfast, kV2U), tf_d = bit(p.v2_tfast, kV2Delta), tf_z = bit(p.v2_tfast, kV2Z);

  auto slot_src = [&](int s) { return slot_source<T>(p, b, c0, s); };
  if constexpr (kFast) {  // the slots' sources once, in shared memory (recomputing them per tile cost registers)
    if (tid < kSlots) {
      const SlotSrc src = slot_src(tid);
      sm.src[tid] = static_cast<const T*>(src.ptr);
      sm.src_stride[tid] = kBT ? src.cs : src.ls;
    }
    __syncthreads();
  }
  // The tile at t0 into raw[par]: kFast's stage_fast, else v2's stage_tensor per slot (either orientation, plain
  // loads where 16-byte copies are not legal).
  auto stage = [&](int par, int t0) {
    if constexpr (kFast) {
      stage_fast<T, kBT>(sm.raw[par], sm.src, sm.src_stride, t0, L, tid, has_z);
    } else {
#pragma unroll 1
      for (int s = 0; s < kSlots; ++s) {
        if (!has_z && s >= kSlotZ && s < kSlotB) continue;
        const SlotSrc src = slot_src(s);
        const bool tf = s >= kSlotB ? kBT : bit(p.v2_tfast, src.bit);
        sscan2::stage_tensor<T, kThreads>(sm.raw[par][s], static_cast<const T*>(src.ptr), src.ls, src.cs, tf,
                                          bit(p.v2_vec, src.bit), t0, L, tid);
      }
    }
    sscan2::cp_async_commit();
  };
  stage(tile_first & 1, tile_first * kT);

  // Per-lane constants of the prep. Generic and token-major kFast: channel 4q + j of the warp's 16 (j = 2 nt + e, the
  // mixer v7's labels); token-fast kFast: lane = (channel pair pp = lane % 8: channels 2 pp + e; token quad tq).
  constexpr bool kQuads = kFast && kBT;  // the token-fast kFast prep
  const int pp = lane % 8, tq = lane / 8;
  constexpr int kPC = kQuads ? 2 : 4;
  float bias[kPC], dsk[kPC];
#pragma unroll
  for (int j = 0; j < kPC; ++j) {
    const int pc = hc0 + (kQuads ? 2 * pp + j : 4 * q + j);
    bias[j] = p.delta_bias != nullptr ? p.delta_bias[pc] : 0.f;
    dsk[j] = p.Dskip != nullptr ? p.Dskip[pc] : 0.f;
  }
  // Scan constants and state: h[nt][i] = channel 2g + (i >> 1) of the warp's 16, state 8 nt + 2q + (i & 1).
  float A2[2][4], h[2][4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int cs = hc0 + 2 * g + (i >> 1), n = nt * 8 + 2 * q + (i & 1);
      A2[nt][i] = p.A[(int64_t)cs * kN + n] * sscan::kLog2e;
      h[nt][i] = p.init != nullptr ? p.init[((int64_t)b * D + cs) * kN + n] : 0.f;
    }
  // Sequence split: the state entering this segment - the initial state carried through the earlier segments by the
  // pre-pass's (E, P): h = P_s2 h + E_s2, s2 = 0 .. seg - 1 (fixed order).
  for (int s2 = 0; s2 < seg; ++s2) {
    const float* ep = p.seg_state + (((int64_t)b * segs + s2) * 2) * D * kN;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int64_t o = (int64_t)(hc0 + 2 * g + r) * kN + nt * 8 + 2 * q;
        const float2 e = *reinterpret_cast<const float2*>(ep + o);
        const float2 pv = *reinterpret_cast<const float2*>(ep + (int64_t)D * kN + o);
        h[nt][2 * r] = fmaf(pv.x, h[nt][2 * r], e.x);
        h[nt][2 * r + 1] = fmaf(pv.y, h[nt][2 * r + 1], e.y);
      }
  }
  auto store_h = [&](float* base) {  // base: the (b, D, 16)-layout rows of this sequence
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
        *reinterpret_cast<float2*>(base + (int64_t)(hc0 + 2 * g + r) * kN + nt * 8 + 2 * q) =
            make_float2(h[nt][2 * r], h[nt][2 * r + 1]);
  };
  if (tid < kT / 2) sm.bop[tid][8] = make_float4(0.f, 0.f, 0.f, 0.f);
  const int bsel = q == 0 ? g : 8;  // lanes q > 0 read the zero entry: rows k >= 1 of the B operand
  T* y = p.y != nullptr ? static_cast<T*>(p.y) + (int64_t)b * L * D : nullptr;
  // The item's delta (0 past the end keeps h), du, gate and D u gate from its inputs (v = delta + delta_bias).
  auto item = [&](float u, float v, float zz, bool live, float dk, float& dv, float& duv, float& sz, float& dus) {
    float delta, gz;
    if constexpr (kFastPrep) {
      delta = softplus_fast(v);
      gz = has_z ? zz * sscan::sigmoid_fast(zz) : 1.f;
    } else {
      delta = p.softplus ? sscan::softplus_v2(v, p.fast_prep) : v;
      gz = has_z ? zz * (p.fast_prep ? sscan::sigmoid_fast(zz) : sscan::sigmoidf_(zz)) : 1.f;
    }
    dv = live ? delta : 0.f;
    duv = live ? scan7::tf32_rna(delta * u) : 0.f;
    sz = gz;
    dus = dk * u * gz;
  };

  for (int tile = tile_first; tile < tile_end; ++tile) {
    const int t0 = tile * kT, par = tile & 1, nt_live = min(kT, L - t0);
    sscan2::cp_async_wait_all();
    __syncthreads();  // the tile's copies are visible; every reader of the previous tile is done
    if (tile + 1 < tile_end) stage(par ^ 1, t0 + kT);
    if (p.ckpt != nullptr) store_h(p.ckpt + ((int64_t)b * n_tiles + tile) * D * kN);
    const T* ru = sm.raw[par][kSlotU + w];
    const T* rd = sm.raw[par][kSlotDelta + w];
    const T* rz = sm.raw[par][kSlotZ + w];
    const T* rB = sm.raw[par][kSlotB];
    const T* rC = sm.raw[par][kSlotC];
    // the tile's B operand per token pair, (B_t[bg], B_t[8 + bg], B_t+1[bg], B_t+1[8 + bg]): one entry per thread
    sm.bop[tid / 8][tid % 8] = b_operand<T, kFast, kBT>(rB, tid);
    __syncthreads();  // bop (the previous tile's readers were done at the first barrier)
#pragma unroll 1
    for (int hf = 0; hf < 2; ++hf) {
      if constexpr (kQuads) {  // 4 tokens of the lane's 2 channels per 8-byte load
        const int tb = hf * kHalf + 4 * tq;
        uint2 wu[2], wd[2], wz[2];  // (packed: unpacked per item, fewer live registers)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int off = S::tf(2 * pp + e, tb);
          wu[e] = *reinterpret_cast<const uint2*>(ru + off);
          wd[e] = *reinterpret_cast<const uint2*>(rd + off);
          wz[e] = has_z ? *reinterpret_cast<const uint2*>(rz + off) : make_uint2(0u, 0u);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int tl = 4 * tq + k;
          float dv[2], duv[2], sz[2], dus[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            auto val = [&](uint2 v2) { return sscan2::half_of<T>(k < 2 ? v2.x : v2.y, k & 1); };
            item(val(wu[e]), val(wd[e]) + bias[e], val(wz[e]), tb + k < nt_live, dsk[e], dv[e], duv[e], sz[e], dus[e]);
          }
          sm.du[w][tl][pp] = make_float4(duv[0], duv[1], dv[0], dv[1]);
          sm.gt[w][tl][pp] = make_float4(sz[0], sz[1], dus[0], dus[1]);
        }
      } else {  // items (token g + 8 rr, channel 4q + 2 nt + e) into du / gt rows 2q + nt, as the mixer's
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int tl = g + 8 * rr, t = hf * kHalf + tl;
          uint2 wu, wd, wz;  // token-major kFast: the token's 4 channels 4q .. 4q + 3 per 8-byte load
          if constexpr (kFast) {
            wu = *reinterpret_cast<const uint2*>(ru + t * 16 + 4 * q);
            wd = *reinterpret_cast<const uint2*>(rd + t * 16 + 4 * q);
            wz = has_z ? *reinterpret_cast<const uint2*>(rz + t * 16 + 4 * q) : make_uint2(0u, 0u);
          }
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            float dv[2], duv[2], sz[2], dus[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = 2 * nt + e, ch = 4 * q + j;
              float u, v, zz;
              if constexpr (kFast) {
                auto val = [&](uint2 w2) { return sscan2::half_of<T>(j < 2 ? w2.x : w2.y, j & 1); };
                u = val(wu), v = val(wd), zz = val(wz);
              } else {
                u = sscan::to_f(at<T, kFast>(ru, ch, t, tf_u)), v = sscan::to_f(at<T, kFast>(rd, ch, t, tf_d));
                zz = has_z ? sscan::to_f(at<T, kFast>(rz, ch, t, tf_z)) : 0.f;
              }
              item(u, v + bias[j], zz, t < nt_live, dsk[j], dv[e], duv[e], sz[e], dus[e]);
            }
            sm.du[w][tl][2 * q + nt] = make_float4(duv[0], duv[1], dv[0], dv[1]);
            sm.gt[w][tl][2 * q + nt] = make_float4(sz[0], sz[1], dus[0], dus[1]);
          }
        }
      }
      {  // the C words per token pair and lane quad: (C[2qq], C[2qq+1]) and (C[8+2qq], C[9+2qq]) of both tokens
        const int pr = lane / 4, qq = lane % 4, t = hf * kHalf + 2 * pr;
        if constexpr (kBT) {  // words of two tokens per state, regrouped into words of two states per token
          const unsigned a = pair_word<T, kFast>(rC, 2 * qq, t), a1 = pair_word<T, kFast>(rC, 2 * qq + 1, t);
          const unsigned c = pair_word<T, kFast>(rC, 8 + 2 * qq, t), c1 = pair_word<T, kFast>(rC, 9 + 2 * qq, t);
          sm.cop[w][pr][qq] = make_uint4(__byte_perm(a, a1, 0x5410), __byte_perm(c, c1, 0x5410),
                                         __byte_perm(a, a1, 0x7632), __byte_perm(c, c1, 0x7632));
        } else {  // token-major: a token's two states in one word
          auto ld = [&](int n, int tt) { return *reinterpret_cast<const unsigned*>(rC + tt * 16 + n); };
          sm.cop[w][pr][qq] = make_uint4(ld(2 * qq, t), ld(8 + 2 * qq, t), ld(2 * qq, t + 1), ld(8 + 2 * qq, t + 1));
        }
      }
      __syncwarp();
      scan7::scan_half<T, false>(sm.du[w], sm.bop, hf * kHalf / 2, bsel, sm.cop[w], sm.yf[w], A2, h, g, q);
      __syncwarp();
      if (y != nullptr) {  // the half's gated y rows (b, L, D)
        const int row = lane / 2, part = lane % 2, t = t0 + hf * kHalf + row;
        const uint4 out = scan7::gate_row<T>(sm.yf[w], sm.gt[w], row, part);
        if (t < L) *reinterpret_cast<uint4*>(y + (int64_t)t * D + hc0 + part * 8) = out;
      }
      __syncwarp();
    }
  }
  if (p.final_state != nullptr && seg == segs - 1) store_h(p.final_state + (int64_t)b * D * kN);
}

template <typename T, bool kBT, bool kFast, bool kFastPrep>
void launch(const SScanParams& p, void* stream) {
  constexpr int smem = sizeof(Smem<T, kFast>);
  auto kernel = sscan_fwd7_kernel<T, kBT, kFast, kFastPrep>;
  static const bool configured = scan7::allow_smem(reinterpret_cast<const void*>(kernel), smem);  // once
  (void)configured;
  const dim3 grid(p.dim / (kHeads * 16), p.batch * p.fwd_segments);
  kernel<<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace sscan7

// The state pre-pass of the forward's sequence split (p.fwd_segments > 1, session 27). Why: at batch 1 the v7
// forward has d_inner / 64 blocks (64 at d_inner 4096: half an H100's SMs, one block each, latency-bound: 1.09 ms at
// L 8192 against v2's 0.70); split into S segments, S times as many blocks run, each over L / S tokens, once every
// segment's entering state is known. For every segment s < S - 1 of every sequence: E_s = the state at its end from a
// zero state at its start (h = exp(delta_t A) h + (delta_t u_t) B_t over its tokens) and P_s = exp(A sum_t delta_t);
// the main kernel's block of segment s folds the earlier segments' (E, P) into its starting state. The cost is a
// second exponential per element over (S - 1) / S of the sequence (kernels.md: a split costs the bottleneck unit a
// second pass), paid where the unsplit grid leaves the SMs idle. du = tf32(delta u) as the main kernel rounds it.
// The layout is the backward's carry pre-pass's (sscan_prepass.cuh; sscan_bwd7.cuh sscan7c): block = one head of one
// segment, 4 groups of 64 threads over contiguous quarters of its tiles, folded at the end; per group and tile: wait,
// barrier A, prep (raw u / delta / B -> fp32 delta, du, B), barrier B, the next tile's copies (in flight during the
// scan), the scan (thread = channel tid / 4, states 4 (tid % 4) ..).
// Only with the forward v7's fast stagings (kBT: token-fast rows, else token-major; 16-byte copies, zero-filled past
// the end).
namespace sscan7p {

using sscan::kT;
using sscan7::kN;
using sscanpp::kGT;
using sscanpp::kGroups;
using sscanpp::kThr;
enum { kRU = 0, kRDelta = 1, kRB = 2, kRSlots = 3 };

template <typename T>
struct GroupSmem {                      // 9 KB; 36 KB per block
  alignas(16) T raw[kRSlots][16 * kT];  // u, delta (the head's 16 channels), B (16 states); kBT [row][token]
  alignas(16) float dl[kT][16];         // [token][channel]; 0 past the end
  alignas(16) float du[kT][16];         // tf32(delta u)
  alignas(16) float bv[kT][16];         // [token][state]
};

// (Launch bounds: 5 blocks per SM, as its 42 KB of shared memory allow - 48 registers, no spills; the octet arrays of
// session 28 took it to 64 registers and 4 blocks.)
template <typename T, bool kBT, bool kFastPrep>
__global__ void __launch_bounds__(kThr, 5) sscan_fwd7_state_kernel(SScanParams p) {
  __shared__ GroupSmem<T> gs[kGroups];
  const int gi = threadIdx.x / kGT, tid = threadIdx.x % kGT, S = p.fwd_segments, nseg = S - 1;
  const int c0 = blockIdx.x * 16, b = blockIdx.y / nseg, seg = blockIdx.y % nseg;  // (segments 0 .. S - 2)
  const int D = p.dim, L = p.seqlen;
  const int seg_first = seg * p.fwd_seg_tiles, seg_last = min(p.n_chunks, seg_first + p.fwd_seg_tiles) - 1;
  int tile_first, tile_last;
  sscanpp::group_tiles(seg_first, seg_last, gi, tile_first, tile_last);
  GroupSmem<T>& sm = gs[gi];
  // The slots' first elements (row 0, token 0) and row strides (kBT: channel / state rows, else token rows).
  const T* base[kRSlots];
  int64_t stride[kRSlots];
  const int slot_of[kRSlots] = {sscan7::kSlotU, sscan7::kSlotDelta, sscan7::kSlotB};
#pragma unroll
  for (int s = 0; s < kRSlots; ++s) {
    const sscan7::SlotSrc src = sscan7::slot_source<T>(p, b, c0, slot_of[s]);  // (head 0 of a block at c0)
    base[s] = static_cast<const T*>(src.ptr);
    stride[s] = kBT ? src.cs : src.ls;
  }
  auto copy_tile = [&](int t0, bool have) {
    sscanpp::copy_tile<T, kBT, kRSlots>(sm.raw, base, stride, 0u, tid, t0, L, have);
  };
  // prep mapping: row (channel / state) tid % 16, tokens 8 (tid / 16) .. + 7 (octet tid / 16 of the tile)
  const int qr = tid % 16, qo = tid / 16, qt0 = 8 * qo;
  const float bias = p.delta_bias != nullptr ? p.delta_bias[c0 + qr] : 0.f;
  // scan mapping: channel sc, states 4 sq .. + 3
  const int sc = tid / 4, sq = tid % 4;
  float A2[4], h[4] = {0.f, 0.f, 0.f, 0.f}, sdelta = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) A2[i] = p.A[(int64_t)(c0 + sc) * kN + 4 * sq + i] * sscan::kLog2e;

  copy_tile(tile_first * kT, tile_first <= tile_last);
  for (int tile = tile_first; tile <= tile_last; ++tile) {
    const int t0 = tile * kT;
    sscan2::cp_async_wait_all();
    sscanpp::group_sync(gi);  // A
    float rd[8], ru[8], rb[8];
    sscanpp::raw_octet<T, kBT>(sm.raw[kRDelta], qr, qo, rd);
    sscanpp::raw_octet<T, kBT>(sm.raw[kRU], qr, qo, ru);
    sscanpp::raw_octet<T, kBT>(sm.raw[kRB], qr, qo, rb);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int t = qt0 + k;
      const bool live = t0 + t < L;
      const float delta = live ? sscan7::delta_of<kFastPrep>(p, rd[k] + bias) : 0.f;
      sm.dl[t][qr] = delta;
      sm.du[t][qr] = live ? scan7::tf32_rna(delta * ru[k]) : 0.f;
      sm.bv[t][qr] = rb[k];
    }
    sscanpp::group_sync(gi);  // B
    copy_tile(t0 + kT, tile < tile_last);
#pragma unroll
    for (int t = 0; t < kT; ++t) {
      const float dl = sm.dl[t][sc], du = sm.du[t][sc];
      const float4 b4 = *reinterpret_cast<const float4*>(&sm.bv[t][4 * sq]);
      const float bb[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) h[i] = fmaf(ex2(dl * A2[i]), h[i], du * bb[i]);
      sdelta += dl;
    }
  }
  sscan2::cp_async_wait_all();  // (the last, empty copy)
  // E = E_3 + P_3 (E_2 + P_2 (E_1 + P_1 E_0)) (group 0 holds the earliest tiles), P = exp(A sum delta)
  float* out = p.seg_state + (((int64_t)b * S + seg) * 2) * D * kN + (int64_t)(c0 + sc) * kN + 4 * sq;
  sscanpp::fold_groups<true>(gi, tid, h, sdelta, A2, out, (int64_t)D * kN);
}

template <typename T, bool kBT, bool kFastPrep>
void launch(const SScanParams& p, void* stream) {
  const dim3 grid(p.dim / 16, p.batch * (p.fwd_segments - 1));
  sscan_fwd7_state_kernel<T, kBT, kFastPrep><<<grid, kThr, 0, static_cast<cudaStream_t>(stream)>>>(p);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace sscan7p

template <typename T>
void launch_sscan_fwd7(const SScanParams& p, void* stream) {
  const int fast = sscan_fwd7_fast_layout(p);
  const bool bt = ((p.v2_tfast >> kV2B) & 1u) != 0;
  auto go = [&](auto fast_prep) {
    constexpr bool kFP = decltype(fast_prep)::value;
    if (p.fwd_segments > 1) {  // the state pre-pass of the sequence split (the host splits only the fast stagings)
      if (fast == 1) sscan7p::launch<T, true, kFP>(p, stream);
      else sscan7p::launch<T, false, kFP>(p, stream);
    }
    if (fast == 1) sscan7::launch<T, true, true, kFP>(p, stream);
    else if (fast == 2) sscan7::launch<T, false, true, kFP>(p, stream);
    else if (bt) sscan7::launch<T, true, false, kFP>(p, stream);
    else sscan7::launch<T, false, false, kFP>(p, stream);
  };
  if (p.softplus && p.fast_prep) go(std::true_type{});
  else go(std::false_type{});
}

}  // namespace apriel
