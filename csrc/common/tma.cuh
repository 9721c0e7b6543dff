// Tile staging by Hopper's bulk tensor copy engine (TMA) through CUTLASS / CuTe's sm_90 primitives.
//
// Why: the scan kernels stage 32-token tiles of small column slices (16 channels = 32 bytes per row) of the
// token-major in_proj output. With cp.async every thread of the block computes row / column addresses, masks the
// rows past the sequence end and issues ~6 16-byte copies per tile; with TMA one thread issues one bulk copy per
// slice (a 16-column x 32-row box of a (batch, rows, columns) tensor map), the copy engine zero-fills the rows past
// the sequence end (and, for dt_low, the columns past dt_rank) and completes the bytes on an mbarrier.
// What CUTLASS gives: the PTX of the copy (cute::SM90_TMA_LOAD_3D) and of the transaction barrier
// (cutlass::arch::ClusterTransactionBarrier); only these two light headers are included (~3 s of nvcc per TU, no
// CuTe layout algebra). The tensor maps are encoded on the host through the driver's cuTensorMapEncodeTiled,
// fetched with cudaGetDriverEntryPointByVersion (no link against libcuda).
//
// Available when setup.py found CUTLASS's headers (APRIEL_HAVE_CUTLASS, from the nvidia-cutlass wheel or
// APRIEL_CUTLASS_DIR) AND the translation unit asks for it by defining APRIEL_TMA_TU before its first include (the
// TUs that instantiate a TMA kernel: mixer_scan_fwd5_{bf16,fp16}.cu, mixer_scan_fwd7_*.cu, mixer_scan_bwd7_*.cu);
// the other scan TUs include this header for the types only and skip CUTLASS's headers (~3 s of nvcc each). A TMA
// TU that forgot the macro runs cp.async (usable() is false there) - the GPU tests that compare the two stagings
// fail in that case. The functions have internal linkage (anonymous namespace): their bodies differ between the two
// kinds of TU. The device code is compiled for sm_90 only. Launchers call tma::usable() to decide at run time
// (compute capability >= 9.0, the driver entry point found, APRIEL_SCAN_TMA not "0").
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(APRIEL_HAVE_CUTLASS) && defined(APRIEL_TMA_TU)
#include <cuda.h>  // CUtensorMap, cuTensorMapEncodeTiled's types
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#define APRIEL_TMA 1
#else
#define APRIEL_TMA 0
#endif

namespace apriel {
namespace tma {

// A CUtensorMap's storage: one type in every TU (kernel signatures do not depend on the build), passed to kernels as
// a __grid_constant__ parameter. 128-byte aligned as CUDA 13's CUtensorMap (TMA needs >= 64).
struct alignas(128) Map {
  unsigned long long opaque[16];
};
#if APRIEL_TMA
static_assert(sizeof(Map) == sizeof(CUtensorMap) && alignof(Map) >= alignof(CUtensorMap), "Map holds a CUtensorMap");
#endif

// Tensor maps of the scan's token-major inputs: zxbc (b, L, 2D + 2X) and dt_low (b, L, R), boxes of 16 columns x
// 32 rows of one sequence (the forward v7).
struct ScanMaps {
  Map zxbc;
  Map dt;
};
// The backward v7 adds dy (b, L, D) in the same boxes and the x rows before a tile (zxbc, boxes of 16 x 4 rows).
struct ScanBwdMaps {
  ScanMaps fwd;
  Map dy;
  Map halo;
};

constexpr int kBoxCols = 16;
constexpr int kBoxRows = 32;

namespace {  // internal linkage: see the header comment

#if APRIEL_TMA
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiled encode_fn() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}
#endif

// TMA staging can run on the current device: built with CUTLASS, compute capability >= 9.0, the driver's encoder
// found, and not switched off (APRIEL_SCAN_TMA=0, read per call like the other kernel-selection variables).
inline bool usable() {
#if APRIEL_TMA
  const char* env = std::getenv("APRIEL_SCAN_TMA");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) !=
                                                 cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major >= 9 && encode_fn() != nullptr;
#else
  return false;
#endif
}

// A (batch, rows, cols) tensor of 2-byte elements with unit column stride (strides in elements), read in boxes of
// kBoxCols x box_rows x 1. Rows outside [0, rows) and columns >= cols read as zeros. False when the encoder refuses (the
// caller falls back to cp.async): base not 16-byte aligned, strides not multiples of 16 bytes, ...
inline bool encode_rows16(Map* map, const void* base, int64_t batch, int64_t rows, int64_t cols, int64_t row_stride,
                          int64_t batch_stride, int box_rows = kBoxRows) {
#if APRIEL_TMA
  const EncodeTiled fn = encode_fn();
  if (fn == nullptr || batch < 1 || rows < 1 || cols < 1) return false;
  const cuuint64_t dims[3] = {(cuuint64_t)cols, (cuuint64_t)rows, (cuuint64_t)batch};
  // strides of dims 1.. in bytes; a single sequence may carry any batch stride (it is never used)
  const cuuint64_t strides[2] = {(cuuint64_t)row_stride * 2, (cuuint64_t)(batch > 1 ? batch_stride : rows * row_stride) * 2};
  const cuuint32_t box[3] = {kBoxCols, (cuuint32_t)box_rows, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  return fn(reinterpret_cast<CUtensorMap*>(map), CU_TENSOR_MAP_DATA_TYPE_UINT16, 3, const_cast<void*>(base), dims, strides, box, elem_strides,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
#else
  (void)map, (void)base, (void)batch, (void)rows, (void)cols, (void)row_stride, (void)batch_stride, (void)box_rows;
  return false;
#endif
}

// Device side (sm_90): one mbarrier per staging buffer, armed by the one issuing thread with the tile's byte count.
__device__ __forceinline__ void barrier_init(uint64_t* bar) {
#if APRIEL_TMA
  cutlass::arch::ClusterTransactionBarrier::init(bar, 1);
#endif
}
// Makes barrier_init visible to the copy engine (and, after a block barrier, to the other threads).
__device__ __forceinline__ void barrier_init_fence() {
#if APRIEL_TMA
  cutlass::arch::fence_barrier_init();
#endif
}
// The barriers of a multi-buffered stage, by the one issuing thread (a block barrier follows before any wait).
template <int N>
__device__ __forceinline__ void init_barriers(uint64_t (&bar)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) barrier_init(&bar[i]);
  barrier_init_fence();
}
__device__ __forceinline__ void expect_bytes(uint64_t* bar, uint32_t bytes) {
#if APRIEL_TMA
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bar, bytes);
#endif
}
// Waits for the completion of the barrier's phase with this parity (uses 0, 1, 0, ... of one buffer).
__device__ __forceinline__ void wait(uint64_t* bar, uint32_t parity) {
#if APRIEL_TMA
  cutlass::arch::ClusterTransactionBarrier::wait(bar, parity);
#endif
}
// One box (kBoxCols x the map's box rows, 2-byte elements, dense rows of 32 bytes) at (col, row, batch) into dst
// (128-byte aligned). The inputs are read once per block: evict-first in L2.
__device__ __forceinline__ void load_box(const Map& map, uint64_t* bar, void* dst, int col, int row, int batch) {
#if APRIEL_TMA
  cute::SM90_TMA_LOAD_3D::copy(&map, bar, static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_FIRST), dst, col,
                               row, batch);
#endif
}

}  // namespace
}  // namespace tma
}  // namespace apriel
