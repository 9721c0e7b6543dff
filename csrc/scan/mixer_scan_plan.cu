// The varlen plan of a packed-documents forward (session 17): one block lists the documents of seq_idx, estimates
// the varlen v7 kernel's time (mixer_scan_fwd7.cuh, kVar) against the other kernel's, and when varlen wins writes
// the document list for it, longest first, and sets the flag that makes the other kernel return at once.
//
// Why on the device: which kernel is faster depends on the document lengths (a sequence that is one long document
// runs 3.5x slower as one block per channel group; short documents give batch 1 the blocks it lacks), and reading
// them on the host would sync every call and break CUDA-graph capture. Both kernels are launched; the plan and the
// empty launch of the one not picked cost 7-22 us per call (H100, bench/results/s17/run_454d0e8/varlen.json).
//
// Shape contract: seq_idx (batch, seqlen) int32 contiguous; a document starts at token 0 and wherever the id changes
// (as for every kernel with documents: the ids need not increase). workspace: kVarlenWorkspaceInts + block_columns
// int32 (scan_params.h): items (int4 x kVarlenMaxDocs), count, skip, then one counter per channel group.
#include "../common/cuda_check.h"
#include "scan_params.h"

#include <cstdint>

namespace apriel {
namespace {

constexpr int kPlanThreads = 1024;
constexpr int kPlanWarps = kPlanThreads / 32;
constexpr int kTile = 32;  // the forward's tile (scan::kChunk)
static_assert((kVarlenMaxDocs & (kVarlenMaxDocs - 1)) == 0, "the bitonic sort needs a power of two");

// Exclusive prefix sum of v over the block (and the total); every thread must call it.
__device__ int block_exclusive_sum(int v, int* warp_sums, int& total) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[w] = x;
  __syncthreads();
  if (w == 0) {
    int s = warp_sums[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    warp_sums[lane] = s;
  }
  __syncthreads();
  const int before = (w > 0 ? warp_sums[w - 1] : 0) + x - v;
  total = warp_sums[kPlanWarps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before;
}

// Max and sum over the block; every thread gets both.
__device__ void block_max_sum(int& mx, int& sum, int* red) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
  }
  if (lane == 0) red[w] = mx, red[kPlanWarps + w] = sum;
  __syncthreads();
  mx = 0, sum = 0;
  for (int i = 0; i < kPlanWarps; ++i) mx = max(mx, red[i]), sum += red[kPlanWarps + i];
}

__global__ void __launch_bounds__(kPlanThreads)
    mixer_scan_plan_kernel(const int* seq_idx, int batch, int L, int block_columns, VarlenPlanCost cost, int force,
                           int* ws) {
  __shared__ int2 docs[kVarlenMaxDocs];                  // (sequence, first token), in token order
  __shared__ unsigned long long keys[kVarlenMaxDocs];    // (2^31 - 1 - length) << 32 | index: longest first
  __shared__ int red[2 * kPlanWarps];
  int4* items = reinterpret_cast<int4*>(ws);
  int* count = ws + 4 * kVarlenMaxDocs;
  int* skip = count + 1;
  int* next = count + 2;
  const int tid = threadIdx.x;

  // 1. Document starts (the first token, and every token whose id differs from the previous one), 4 tokens per
  // thread and step, compacted in token order.
  int n = 0;
  for (int b = 0; b < batch; ++b) {
    const int* sq = seq_idx + (int64_t)b * L;
    for (int base = 0; base < L; base += 4 * kPlanThreads) {
      const int t0 = base + 4 * tid;
      unsigned flags = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int t = t0 + j;
        if (t < L && (t == 0 || sq[t] != sq[t - 1])) flags |= 1u << j;
      }
      int total;
      int at = n + block_exclusive_sum(__popc(flags), red, total);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if ((flags >> j) & 1u) {
          if (at < kVarlenMaxDocs) docs[at] = make_int2(b, t0 + j);
          ++at;
        }
      n += total;
    }
  }
  __syncthreads();
  const bool fits = n <= kVarlenMaxDocs;
  auto doc_end = [&](int i) { return i + 1 < n && docs[i + 1].x == docs[i].x ? docs[i + 1].y : L; };

  // 2. The estimate: the longest document's tiles alone, or all (document, group) tiles over the SM slots; each
  // document counts one tile more for its start (the block's pipeline fills again).
  int max_tiles = 0, sum_tiles = 0;
  if (fits) {
    for (int i = tid; i < n; i += kPlanThreads) {
      const int tiles = (doc_end(i) + kTile - 1) / kTile - docs[i].y / kTile + 1;
      max_tiles = max(max_tiles, tiles), sum_tiles += tiles;
    }
  }
  block_max_sum(max_tiles, sum_tiles, red);
  const float est =
      fmaxf(cost.lat_tile * max_tiles, cost.thr_tile * (float)block_columns * (float)sum_tiles / cost.slots);
  const bool pick = fits && (force != 0 || est < cost.margin * cost.other_us);
  for (int c = tid; c < block_columns; c += kPlanThreads) next[c] = 0;  // (the varlen kernel takes items either way)
  if (!pick) {
    if (tid == 0) *count = 0, *skip = 0;
    return;
  }

  // 3. Longest first (the blocks take documents in list order: the short ones fill in at the end), then the list.
  int n2 = 1;
  while (n2 < n) n2 <<= 1;
  for (int i = tid; i < n2; i += kPlanThreads) {
    const unsigned len = i < n ? (unsigned)(doc_end(i) - docs[i].y) : 0u;
    keys[i] = i < n ? ((unsigned long long)(0x7fffffffu - len) << 32) | (unsigned)i : ~0ull;
  }
  __syncthreads();
  for (int k = 2; k <= n2; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < n2; i += kPlanThreads) {
        const int ij = i ^ j;
        if (ij > i) {
          const unsigned long long a = keys[i], c = keys[ij];
          if ((a > c) == ((i & k) == 0)) keys[i] = c, keys[ij] = a;
        }
      }
      __syncthreads();
    }
  for (int i = tid; i < n; i += kPlanThreads) {
    const int d = (int)(keys[i] & 0xffffffffu);
    items[i] = make_int4(docs[d].x, docs[d].y, doc_end(d), 0);
  }
  if (tid == 0) *count = n, *skip = 1;
}

}  // namespace

void launch_plan_documents(const int* seq_idx, int batch, int seqlen, int block_columns, VarlenPlanCost cost, int force,
                           int* workspace, void* stream) {
  mixer_scan_plan_kernel<<<1, kPlanThreads, 0, static_cast<cudaStream_t>(stream)>>>(seq_idx, batch, seqlen,
                                                                                 block_columns, cost, force, workspace);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace apriel
