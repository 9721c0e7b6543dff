// Raw-tile staging shared by the mixer scan forward v4 / v5 (mixer_scan_fwd4.cuh) and backward v4
// (mixer_scan_bwd4.cuh): the cp.async primitives, the raw tile as it sits in global memory (activation dtype), and
// the copies of a tile's x / B / C / z slices of the in_proj row and of its dt_low row. The callers add their own
// extras (the forward: document ids; the backward: dy, the conv halo rows and their ids).
//
// Shape contract (block = one head of one sequence, NT threads; T = activation dtype, kVec = 16 / sizeof(T)):
//   RawTile<T, kR>: x / B / C / z [kChunk][kN] (this head's 16-wide slices), dt [kChunk][kR] (dt_low, columns
//   >= dt_rank never written), seq [kChunk]. Row i holds position t0 + i; rows past the sequence end are zero.
//   The 16-byte paths need p.zxbc_vec16 / p.dt_vec16 (checked by the host); the plain paths take any stride.
#pragma once
#include "scan_common.cuh"

namespace apriel {
namespace scan4 {

using scan::from_f;
using scan::kChunk;
using scan::kN;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// The raw tile as it sits in global memory (activation dtype); kR = staged dt_rank (16 or 32).
template <typename T, int kR>
struct RawTile {
  alignas(16) T x[kChunk][kN];
  alignas(16) T B[kChunk][kN];
  alignas(16) T C[kChunk][kN];
  alignas(16) T z[kChunk][kN];
  alignas(16) T dt[kChunk][kR];
  alignas(16) int seq[kChunk];
};

// x, B, C, z slices (columns col_x / col_B / col_C / col_z of the in_proj row zx of this sequence) by 16-byte
// cp.async: kChunk rows x kN / kVec pieces per slice spread over the block; the slice and its column are
// compile-time per unrolled step, so a copy costs one address computation and the LDGSTS.
template <typename T, int NT, int kR>
__device__ __forceinline__ void stage_zxbc_vec16(const MixerScanParams& p, RawTile<T, kR>& r, const T* zx, int tid,
                                                 int col_x, int col_B, int col_C, int col_z, int t0) {
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte copy
  constexpr int kCPR = kN / kVec;       // copies per 16-wide row slice
  constexpr int kPer = kChunk * kCPR;
#pragma unroll
  for (int slice = 0; slice < 4; ++slice) {
    const int col = slice == 0 ? col_x : slice == 1 ? col_B : slice == 2 ? col_C : col_z;
    T* base = slice == 0 ? &r.x[0][0] : slice == 1 ? &r.B[0][0] : slice == 2 ? &r.C[0][0] : &r.z[0][0];
#pragma unroll
    for (int k = 0; k < (kPer + NT - 1) / NT; ++k) {
      const int i = tid + k * NT;
      if (kPer % NT == 0 || i < kPer) {
        const int row = i / kCPR, part = i % kCPR, pos = t0 + row;
        const bool ok = pos < p.seqlen;
        cp_async16(base + i * kVec, ok ? zx + (int64_t)pos * p.zxbc_row_stride + col + part * kVec : zx, ok);
      }
    }
  }
}

// The same slices by plain element loads (misaligned views).
template <typename T, int NT, int kR>
__device__ __forceinline__ void stage_zxbc_plain(const MixerScanParams& p, RawTile<T, kR>& r, const T* zx, int tid,
                                                 int col_x, int col_B, int col_C, int col_z, int t0) {
#pragma unroll 4
  for (int i = tid; i < 4 * kChunk * kN; i += NT) {
    const int slice = i / (kChunk * kN), rem = i % (kChunk * kN);
    const int row = rem / kN, c = rem % kN, pos = t0 + row;
    const int col = slice == 0 ? col_x : slice == 1 ? col_B : slice == 2 ? col_C : col_z;
    T* dst = slice == 0 ? &r.x[row][0] : slice == 1 ? &r.B[row][0] : slice == 2 ? &r.C[row][0] : &r.z[row][0];
    dst[c] = pos < p.seqlen ? zx[(int64_t)pos * p.zxbc_row_stride + col + c] : from_f<T>(0.f);
  }
}

// kChunk rows of a kW-wide slice (row stride `stride` elements, positions t0 ..) into dst[kChunk][kW]: 16-byte
// cp.async when vec16 (the host checked alignment), plain loads otherwise; columns >= valid are not written (their
// readers mask them), rows past the sequence end are zero-filled. Used for dt_low (forward and backward) and dy.
template <typename T, int NT, int kW>
__device__ __forceinline__ void stage_rows(T (*dst)[kW], const T* src, int64_t stride, int valid, bool vec16,
                                           const MixerScanParams& p, int tid, int t0) {
  constexpr int kVec = 16 / sizeof(T), kParts = kW / kVec;
  if (vec16) {  // valid is a multiple of kVec
    constexpr int kCopies = kChunk * kParts;
#pragma unroll
    for (int k = 0; k < (kCopies + NT - 1) / NT; ++k) {
      const int i = tid + k * NT;
      if (kCopies % NT != 0 && i >= kCopies) break;
      const int row = i / kParts, part = i % kParts, pos = t0 + row;
      if (part * kVec < valid) {
        const bool ok = pos < p.seqlen;
        cp_async16(&dst[row][part * kVec], ok ? src + (int64_t)pos * stride + part * kVec : src, ok);
      }
    }
  } else {
#pragma unroll 4
    for (int i = tid; i < kChunk * kW; i += NT) {
      const int row = i / kW, c = i % kW, pos = t0 + row;
      if (c < valid) dst[row][c] = pos < p.seqlen ? src[(int64_t)pos * stride + c] : from_f<T>(0.f);
    }
  }
}

// dt_low rows of sequence b (16-byte copies when p.dt_vec16, i.e. dt_rank is a multiple of kVec; plain loads
// otherwise). Columns >= dt_rank are not written: the dt_proj readers mask them.
template <typename T, int NT, int kR>
__device__ __forceinline__ void stage_dt(const MixerScanParams& p, RawTile<T, kR>& r, int b, int tid, int t0) {
  const T* dtl = static_cast<const T*>(p.dt_low) + (int64_t)b * p.dt_batch_stride;
  stage_rows<T, NT, kR>(r.dt, dtl, p.dt_row_stride, p.dt_rank, p.dt_vec16, p, tid, t0);
}

}  // namespace scan4
}  // namespace apriel
