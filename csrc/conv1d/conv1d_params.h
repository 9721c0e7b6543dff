// Parameters of the causal depthwise conv1d kernels: raw pointers plus element strides, filled by the
// host file conv1d_api.cpp. Included by .cu files, so it must stay free of torch headers.
//
// Semantics (apriel_kernels/reference/conv1d.py is the ground truth):
//   out[b,c,t] = act(bias[c] + sum_k weight[c,k] * xe[b,c,t-(W-1)+k]),  xe = x for t >= 0, the initial
//   state (or 0) for -(W-1) <= t < 0; a tap whose position lies in an earlier packed document (seq_idx)
//   reads 0. The final state is the last W-1 inputs of the last document.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace apriel {
namespace conv1d {

// Dtype of a small side tensor (weight, bias, conv_state) read with a runtime switch: these are read once
// per thread, so a template parameter for them would multiply instantiations for no speed.
enum ScalarCode : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// Vectorised kernel variant (ConvParams::fwd_impl / bwd_impl; APRIEL_CONV1D_FWD_IMPL / _BWD_IMPL =
// tile|stream|async|deep|wide, and for the backward also fused).
//   deep:  async with kDeepStages (6) cp.async stages instead of 4: 5 chunks in flight per thread, 48 KB smem.
//   fused: (backward) deep + the dweight/dbias partial reduction inside the same kernel after a grid-wide
//          barrier (cooperative launch, one wave), so no second kernel; falls back to deep + the reduction
//          kernel when the grid does not fit in one wave.
//   wide:  async with the block's 4 warps on 4 adjacent channel segments of one token run (forward 2 KB,
//          backward 1 KB contiguous per token row) instead of one segment of 4 runs; the backward "wide"
//          is fused + this mapping (per-thread partial rows: 4x as many, no block reduction).
enum FwdImpl : int { kFwdTile = 0, kFwdStream = 1, kFwdAsync = 2, kFwdDeep = 3, kBwdFused = 4, kFwdWide = 5 };

struct ConvParams {
  int batch, dim, seqlen, width;
  bool silu;

  // x (batch, dim, seqlen) in the kernel's dtype T, element strides.
  const void* x;
  int64_t x_stride_b, x_stride_c, x_stride_l;
  // Forward: out. Backward: dx. (batch, dim, seqlen), dtype T.
  void* out;
  int64_t out_stride_b, out_stride_c, out_stride_l;
  // Backward only: dout (batch, dim, seqlen), dtype T.
  const void* dout;
  int64_t dout_stride_b, dout_stride_c, dout_stride_l;

  // weight (dim, width) and bias (dim,) (nullptr = no bias), any float dtype (ScalarCode).
  const void* weight;
  int64_t weight_stride_c, weight_stride_k;
  int weight_dtype;
  const void* bias;
  int64_t bias_stride;
  int bias_dtype;

  // seq_idx (batch, seqlen) int32, nullptr = one document per row.
  const int32_t* seq_idx;
  int64_t seq_stride_b, seq_stride_l;

  // initial_states (batch, dim, width-1) dtype T, nullptr = zeros.
  const void* init;
  int64_t init_stride_b, init_stride_c, init_stride_k;

  // Forward: final_states out (batch, dim, width-1) contiguous dtype T, nullptr = not requested.
  void* final_out;
  // Backward: dfinal_states (batch, dim, width-1) dtype T (nullptr = zero), dinit out contiguous
  // (batch, dim, width-1) dtype T (nullptr = not requested).
  const void* dfinal;
  int64_t dfinal_stride_b, dfinal_stride_c, dfinal_stride_k;
  void* dinit;

  // Backward: per-(batch, token split) partial sums of dweight | dbias, fp32 (batch*nsplit, dim, width+1),
  // reduced in a fixed order by a second kernel into dweight (dim, width) and dbias (dim,) (nullptr = skip).
  float* workspace;
  int nsplit;       // token splits per batch row
  int split_len;    // tokens per split (a multiple of the kernel's token tile)
  float* dweight;
  float* dbias;

  // Layout choice made by the host: vectorised token-major kernel (x, out, dout have unit channel stride,
  // dim % 8 == 0, 16-byte aligned rows) or the generic strided kernel; tok_fast = the generic kernel maps
  // consecutive threads to consecutive tokens (channel-major data) rather than channels.
  bool vectorized;
  bool tok_fast;
  // weight (dim, width) and bias are contiguous and 16-byte aligned: each thread reads its channels'
  // taps as vectors instead of kCh * (width + 1) scalar loads (the default; APRIEL_CONV1D_VEC_WEIGHTS=0 selects the scalar loads).
  bool weight_vec;
  int fwd_tokens;   // tokens per thread of the vectorised forward (4 or 8)
  // Streaming variants of the vectorised kernels (APRIEL_CONV1D_FWD_IMPL / _BWD_IMPL = stream|async):
  // a thread walks a contiguous run of split_len tokens carrying its window in registers (no halo
  // re-reads, weights loaded once), prefetching the next chunk while computing the current one, in a grid
  // sized to one wave of resident blocks. The forward launcher picks split_len itself; the backward's is
  // set by the host (it sizes the dweight workspace), nsplit then counts blocks along tokens.
  // fwd_impl: kFwdAsync = the stream forward with chunks staged through shared memory by cp.async.
  int fwd_impl;
  int bwd_impl;     // FwdImpl values too: kFwdTile, kFwdStream, kFwdAsync, kFwdDeep or kBwdFused
  // Forward of channel-major data (x and out with unit token stride, 16-byte aligned rows, seqlen a
  // multiple of the 16-byte vector, 2- or 4-byte types): a thread loads 16-byte vectors along the tokens
  // of one channel, the W-1 halo of each comes from its neighbour's vector through shared memory
  // (APRIEL_CONV1D_CM_IMPL=vec; "generic" = the one-element-per-thread kernel). The backward likewise
  // (x, dout and dx in that layout), with nsplit = token tiles of kCmTileVecs vectors per (b, c) row.
  bool chan_vec;
};

// Channel-major vector kernels: 16-byte vectors per block (128 threads x 4), shared with the host's plan.
constexpr int kCmTileVecs = 512;

// Update step: q new tokens per row against cached windows.
struct UpdateParams {
  int batch, dim, seqlen, width, state_len, slots;
  bool silu;
  const void* x;  // (batch, dim, q) dtype T
  int64_t x_stride_b, x_stride_c, x_stride_l;
  void* out;      // (batch, dim, q) contiguous dtype T
  void* conv_state;  // (slots, dim, state_len), any float dtype (state_dtype), updated in place
  int64_t state_stride_b, state_stride_c, state_stride_k;
  int state_dtype;
  const int32_t* slot_idx;  // (batch,) int32, -1 = padding row; nullptr = row i uses slot i
  int64_t slot_stride;
  const void* weight;
  int64_t weight_stride_c, weight_stride_k;
  int weight_dtype;
  const void* bias;
  int64_t bias_stride;
  int bias_dtype;
};

// Launchers, one set per activation dtype (defined in conv1d_<dtype>.cu). They throw std::runtime_error
// on a launch failure.
#define APRIEL_CONV1D_DECLARE(suffix)                                     \
  void causal_conv1d_fwd_##suffix(const ConvParams& params, cudaStream_t stream); \
  void causal_conv1d_bwd_##suffix(const ConvParams& params, cudaStream_t stream); \
  void causal_conv1d_update_##suffix(const UpdateParams& params, cudaStream_t stream);

APRIEL_CONV1D_DECLARE(fp16)
APRIEL_CONV1D_DECLARE(bf16)
APRIEL_CONV1D_DECLARE(fp32)
APRIEL_CONV1D_DECLARE(fp64)
#undef APRIEL_CONV1D_DECLARE

}  // namespace conv1d
}  // namespace apriel
