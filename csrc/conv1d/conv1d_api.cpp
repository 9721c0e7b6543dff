// Host side of the causal conv1d kernels: argument validation (each error names the argument and what
// was expected), output allocation in the layouts of the fake implementations in
// apriel_kernels/conv1d.py, params filling, kernel choice, and the op registrations.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "../common/sm_count.h"
#include "conv1d_params.h"

namespace apriel {
namespace conv1d {
namespace {

using at::Tensor;

bool is_float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

int scalar_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kHalf;
    case at::kBFloat16: return kBFloat16;
    case at::kFloat: return kFloat;
    default: return kDouble;
  }
}

void check_float_tensor(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, ": expected a CUDA tensor on ", like.device(),
              " (like x), got ", t.device());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), name, ": expected dtype float16, bfloat16, float32 or float64, got ",
              t.scalar_type());
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected, const char* names) {
  TORCH_CHECK(t.sizes() == expected, name, ": expected shape ", names, " = ", expected, ", got ", t.sizes());
}

// (b, C, L) in x's layout: token-major when x is (stride(1) == 1 and dim > 1), else contiguous.
Tensor empty_like_layout(const Tensor& x) {
  const int64_t b = x.size(0), c = x.size(1), l = x.size(2);
  if (x.stride(1) == 1 && c > 1) return torch::empty({b, l, c}, x.options()).transpose(1, 2);
  return torch::empty({b, c, l}, x.options());
}

// Token-major with unit channel stride, dim % 8 == 0 and every (b, t) row 16-byte aligned: the vector path.
bool vectorizable(const Tensor& t) {
  const int64_t elems16 = 16 / t.element_size();
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  const bool rows = (t.size(0) == 1 || t.stride(0) % elems16 == 0) && (t.size(2) == 1 || t.stride(2) % elems16 == 0);
  return t.size(1) > 1 && t.stride(1) == 1 && t.size(1) % 8 == 0 && aligned && rows;
}

int num_sms(const Tensor& x) { return sm_count(x.device().index()); }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned_contiguous(const Tensor& t) {
  return t.is_contiguous() && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Vector loads of weight/bias (ConvParams::weight_vec): the default since the H100 run of 2026-11-22
// (fwd b1 L8192 4096 ch 0.085 -> 0.065 ms, 1024 ch 0.031 -> 0.024 ms, fwd+bwd 0.318 -> 0.290 ms; both
// paths pass the same GPU tests). The scalar loads (kCh * (W + 1) per thread, each touching ~16 L1 lines
// per warp) stay selectable with APRIEL_CONV1D_VEC_WEIGHTS=0 for comparison.
bool vector_weights_enabled() {
  const char* env = std::getenv("APRIEL_CONV1D_VEC_WEIGHTS");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

struct Checked {
  int64_t batch, dim, seqlen, width;
};

// Validation shared by forward and backward; returns the sizes.
Checked check_conv_inputs(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                          const std::optional<Tensor>& seq_idx, const std::optional<Tensor>& initial_states) {
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "x: expected 3 dims (batch, dim, seqlen), got shape ", x.sizes());
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "x: expected dtype float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
  const int64_t batch = x.size(0), dim = x.size(1), seqlen = x.size(2);
  TORCH_CHECK(seqlen >= 1, "x: expected seqlen (dim 2) >= 1, got ", seqlen);
  const int64_t int_max = std::numeric_limits<int>::max();
  TORCH_CHECK(batch <= 65535 && dim < int_max && seqlen < int_max,
              "x: expected batch <= 65535 and dim, seqlen < 2^31, got shape ", x.sizes());
  check_float_tensor(weight, "weight", x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == dim, "weight: expected shape (dim, width) with dim = ", dim,
              ", got ", weight.sizes());
  const int64_t width = weight.size(1);
  TORCH_CHECK(width >= 2 && width <= 4, "weight: expected width (dim 1) in 2..4, got ", width);
  if (bias.has_value()) {
    check_float_tensor(*bias, "bias", x);
    check_shape(*bias, "bias", {dim}, "(dim,)");
  }
  if (seq_idx.has_value()) {
    TORCH_CHECK(seq_idx->is_cuda() && seq_idx->device() == x.device(), "seq_idx: expected a CUDA tensor on ",
                x.device(), ", got ", seq_idx->device());
    TORCH_CHECK(seq_idx->scalar_type() == at::kInt, "seq_idx: expected dtype int32, got ", seq_idx->scalar_type());
    check_shape(*seq_idx, "seq_idx", {batch, seqlen}, "(batch, seqlen)");
  }
  if (initial_states.has_value()) {
    check_float_tensor(*initial_states, "initial_states", x);
    check_shape(*initial_states, "initial_states", {batch, dim, width - 1}, "(batch, dim, width - 1)");
  }
  return {batch, dim, seqlen, width};
}

void fill_common(ConvParams& p, const Checked& s, const Tensor& x, const Tensor& weight,
                 const std::optional<Tensor>& bias, const std::optional<Tensor>& seq_idx,
                 const std::optional<Tensor>& init, bool silu) {
  std::memset(&p, 0, sizeof(p));
  p.batch = int(s.batch);
  p.dim = int(s.dim);
  p.seqlen = int(s.seqlen);
  p.width = int(s.width);
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_stride_b = x.stride(0);
  p.x_stride_c = x.stride(1);
  p.x_stride_l = x.stride(2);
  p.weight = weight.data_ptr();
  p.weight_stride_c = weight.stride(0);
  p.weight_stride_k = weight.stride(1);
  p.weight_dtype = scalar_code(weight.scalar_type());
  if (bias.has_value()) {
    p.bias = bias->data_ptr();
    p.bias_stride = bias->stride(0);
    p.bias_dtype = scalar_code(bias->scalar_type());
  }
  if (seq_idx.has_value()) {
    p.seq_idx = seq_idx->data_ptr<int32_t>();
    p.seq_stride_b = seq_idx->stride(0);
    p.seq_stride_l = seq_idx->stride(1);
  }
  if (init.has_value()) {
    p.init = init->data_ptr();
    p.init_stride_b = init->stride(0);
    p.init_stride_c = init->stride(1);
    p.init_stride_k = init->stride(2);
  }
  // Generic kernel: consecutive threads on the unit-stride axis.
  p.tok_fast = x.stride(2) == 1 && !(x.stride(1) == 1 && s.dim > 1);
  p.weight_vec = vector_weights_enabled() && aligned_contiguous(weight) &&
                 (!bias.has_value() || aligned_contiguous(*bias));
}

#define APRIEL_CONV1D_DISPATCH(dtype, fn, params, stream)                                      \
  switch (dtype) {                                                                             \
    case at::kHalf: fn##_fp16(params, stream); break;                                          \
    case at::kBFloat16: fn##_bf16(params, stream); break;                                      \
    case at::kFloat: fn##_fp32(params, stream); break;                                         \
    case at::kDouble: fn##_fp64(params, stream); break;                                        \
    default: TORCH_CHECK(false, "x: unsupported dtype ", dtype);                               \
  }

// Tokens per thread of the vectorised forward: 8. Measured on the H100 (bench/results/conv1d_h100.json,
// rows apriel[tok4] / apriel[tok8]) the 8-token tile was as fast or faster at every benchmark shape,
// including the small b1 L8192 C1024 grid (0.030 vs 0.062 ms). APRIEL_CONV1D_FWD_TOKENS=4 selects the
// 4-token tile (benchmark sweeps, tests of both tilings).
int fwd_tokens() {
  if (const char* env = std::getenv("APRIEL_CONV1D_FWD_TOKENS")) {
    if (std::atoi(env) == 4) return 4;
  }
  return 8;
}

// Kernel variant of the vectorised (token-major) forward / backward: "tile" (the measured default of
// session 1), "stream" (runs of tokens per thread, window in registers, one wave; ConvParams::fwd_impl /
// bwd_impl) or "async" (stream with the chunks staged through shared memory by cp.async).
// APRIEL_CONV1D_FWD_IMPL / APRIEL_CONV1D_BWD_IMPL select; kDefault* is what an unset variable means, to be
// flipped once an H100 run (bench rows apriel[fwd=...] / apriel[bwd=...]) shows a faster variant. Any
// other value is an error naming the variable (silently timing the wrong kernel is worse).
// H100 (session 2, bench/results/s2/conv1d_h100_s2.json): async is the fastest at every bar shape
// (fwd 4096 ch 0.0596 ms vs tile 0.0654; fwd+bwd 0.209 vs 0.288), so it is the default.
constexpr const char* kDefaultFwdImpl = "async";
// bwd: wide (0.133 ms) / fused (0.137) beat async (0.139) by <= 5% at 4096 ch, but both use a cooperative
// grid barrier that has not been tried under CUDA-graph capture: async stays the default.
constexpr const char* kDefaultBwdImpl = "async";

// Session 3 variants (not measured yet; docs/notes/conv1d.md): "deep" = async with 6 cp.async stages (5
// chunks in flight per thread instead of 3), both directions; "fused" (backward only) = deep with the
// dweight/dbias reduction inside the kernel behind a grid-wide barrier (cooperative launch), no second
// kernel; "wide" = a block's 4 warps on adjacent channels of one token run (forward: async otherwise;
// backward: fused otherwise, with per-thread partial rows).
int impl_from_env(const char* var, const char* fallback, bool backward) {
  const char* env = std::getenv(var);
  const char* value = (env == nullptr || *env == '\0') ? fallback : env;
  if (std::strcmp(value, "tile") == 0) return kFwdTile;
  if (std::strcmp(value, "stream") == 0) return kFwdStream;
  if (std::strcmp(value, "async") == 0) return kFwdAsync;
  if (std::strcmp(value, "deep") == 0) return kFwdDeep;
  if (backward && std::strcmp(value, "fused") == 0) return kBwdFused;
  if (std::strcmp(value, "wide") == 0) return kFwdWide;
  TORCH_CHECK(false, var, ": expected \"tile\", \"stream\", \"async\", \"deep\", \"wide\"", backward ? " or \"fused\"" : "",
              ", got \"", value, "\"");
  return kFwdTile;
}

// Channel-major forward: "vec" (fwd_chanmajor_kernel: 16-byte vectors along the tokens, halo through
// shared memory) or "generic" (one element per thread, the session-1 kernel: 11% of the copy rate on the
// H100). APRIEL_CONV1D_CM_IMPL selects.
// H100 (session 2 round 2, bench/results/s2/conv1d_h100_s3.json): vec is 7x faster channel-major (fwd 4096 ch
// 0.055 vs 0.388 ms; bwd 0.142 vs 1.83) and passed every GPU test: the default where it applies.
constexpr const char* kDefaultCmImpl = "vec";

bool chan_vec_from_env() {
  const char* env = std::getenv("APRIEL_CONV1D_CM_IMPL");
  const char* value = (env == nullptr || *env == '\0') ? kDefaultCmImpl : env;
  if (std::strcmp(value, "vec") == 0) return true;
  if (std::strcmp(value, "generic") == 0) return false;
  TORCH_CHECK(false, "APRIEL_CONV1D_CM_IMPL: expected \"vec\" or \"generic\", got \"", value, "\"");
  return false;
}

// Unit token stride, every (b, c) row 16-byte aligned, seqlen a whole number of 16-byte vectors, 2- or
// 4-byte type (the halo of W-1 <= 3 tokens then lies in one neighbouring vector), batch * dim fits the grid.
bool chan_vectorizable(const Tensor& t) {
  const int64_t es = t.element_size(), kv = 16 / es;
  if (es > 4 || t.stride(2) != 1 || t.size(2) % kv != 0) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  if (t.size(1) > 1 && t.stride(1) % kv != 0) return false;
  if (t.size(0) > 1 && t.stride(0) % kv != 0) return false;
  return t.size(0) * t.size(1) <= std::numeric_limits<int>::max();
}

// ------------------------------------------------------------------------------------------- forward
std::tuple<Tensor, Tensor> causal_conv1d_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                             const std::optional<Tensor>& seq_idx,
                                             const std::optional<Tensor>& initial_states, bool return_final_states,
                                             bool silu) {
  const Checked s = check_conv_inputs(x, weight, bias, seq_idx, initial_states);
  const c10::cuda::CUDAGuard guard(x.device());
  std::optional<Tensor> init = initial_states;
  if (init.has_value() && init->scalar_type() != x.scalar_type()) init = init->to(x.scalar_type());
  Tensor out = empty_like_layout(x);
  Tensor final_states = return_final_states ? torch::empty({s.batch, s.dim, s.width - 1}, x.options())
                                            : torch::empty({0}, x.options());
  if (s.batch == 0 || s.dim == 0) return {out, final_states};
  ConvParams p;
  fill_common(p, s, x, weight, bias, seq_idx, init, silu);
  p.out = out.data_ptr();
  p.out_stride_b = out.stride(0);
  p.out_stride_c = out.stride(1);
  p.out_stride_l = out.stride(2);
  p.final_out = return_final_states ? final_states.data_ptr() : nullptr;
  p.vectorized = vectorizable(x);
  p.fwd_tokens = fwd_tokens();
  p.fwd_impl = impl_from_env("APRIEL_CONV1D_FWD_IMPL", kDefaultFwdImpl, false);
  p.chan_vec = !p.vectorized && chan_vec_from_env() && chan_vectorizable(x) && chan_vectorizable(out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  APRIEL_CONV1D_DISPATCH(x.scalar_type(), causal_conv1d_fwd, p, stream);
  return {out, final_states};
}

// ------------------------------------------------------------------------------------------ backward
std::tuple<Tensor, Tensor, Tensor, Tensor> causal_conv1d_bwd(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const std::optional<Tensor>& seq_idx,
    const std::optional<Tensor>& initial_states, const Tensor& dout_in, const std::optional<Tensor>& dfinal_states,
    bool silu) {
  const Checked s = check_conv_inputs(x, weight, bias, seq_idx, initial_states);
  check_float_tensor(dout_in, "dout", x);
  check_shape(dout_in, "dout", x.sizes(), "(batch, dim, seqlen) like x");
  const c10::cuda::CUDAGuard guard(x.device());
  std::optional<Tensor> init = initial_states;
  if (init.has_value() && init->scalar_type() != x.scalar_type()) init = init->to(x.scalar_type());
  const Tensor dout = dout_in.scalar_type() == x.scalar_type() ? dout_in : dout_in.to(x.scalar_type());
  std::optional<Tensor> dfinal;
  if (dfinal_states.has_value() && dfinal_states->numel() > 0) {
    check_float_tensor(*dfinal_states, "dfinal_states", x);
    check_shape(*dfinal_states, "dfinal_states", {s.batch, s.dim, s.width - 1}, "(batch, dim, width - 1)");
    dfinal = dfinal_states->scalar_type() == x.scalar_type() ? *dfinal_states : dfinal_states->to(x.scalar_type());
  }
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = empty_like_layout(x);
  Tensor dweight = torch::empty({s.dim, s.width}, f32);
  Tensor dbias = bias.has_value() ? torch::empty({s.dim}, f32) : torch::empty({0}, f32);
  Tensor dinit = initial_states.has_value() ? torch::empty(initial_states->sizes(), x.options())
                                            : torch::empty({0}, x.options());
  if (s.batch == 0 || s.dim == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias, dinit};
  }
  ConvParams p;
  fill_common(p, s, x, weight, bias, seq_idx, init, silu);
  p.out = dx.data_ptr();
  p.out_stride_b = dx.stride(0);
  p.out_stride_c = dx.stride(1);
  p.out_stride_l = dx.stride(2);
  p.dout = dout.data_ptr();
  p.dout_stride_b = dout.stride(0);
  p.dout_stride_c = dout.stride(1);
  p.dout_stride_l = dout.stride(2);
  if (dfinal.has_value()) {
    p.dfinal = dfinal->data_ptr();
    p.dfinal_stride_b = dfinal->stride(0);
    p.dfinal_stride_c = dfinal->stride(1);
    p.dfinal_stride_k = dfinal->stride(2);
  }
  p.dinit = initial_states.has_value() ? dinit.data_ptr() : nullptr;
  p.vectorized = vectorizable(x) && vectorizable(dout);
  // Every backward kernel writes fp32 (dweight, dbias) partials per (token split, channel); a fixed-order
  // reduction finishes them (deterministic). nsplit splits of split_len tokens per batch row.
  auto launch = [&](int64_t nsplit, int64_t split_len) -> std::tuple<Tensor, Tensor, Tensor, Tensor> {
    Tensor workspace = torch::empty({s.batch * nsplit, s.dim, s.width + 1}, f32);
    p.workspace = workspace.data_ptr<float>();
    p.nsplit = int(nsplit);
    p.split_len = int(split_len);
    p.dweight = dweight.data_ptr<float>();
    p.dbias = bias.has_value() ? dbias.data_ptr<float>() : nullptr;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    APRIEL_CONV1D_DISPATCH(x.scalar_type(), causal_conv1d_bwd, p, stream);
    return {dx, dweight, dbias, dinit};
  };

  // Token splits. Vectorised: one full wave of resident blocks (3 per SM for 16-bit types, 2 otherwise:
  // the kernel's launch bounds), rounded down so no straggler wave; each block then loops over its split.
  // Generic: about 4 blocks per SM. Each split is a multiple of the block's token tile so no tile
  // straddles two splits.
  p.bwd_impl = impl_from_env("APRIEL_CONV1D_BWD_IMPL", kDefaultBwdImpl, true);
  int64_t chan_blocks, tile, target_blocks;
  if (p.vectorized && p.bwd_impl != kFwdTile) {
    // Stream/async kernels: one wave of 3 blocks per SM (their launch bounds guarantee it), each block 4 runs of
    // split_len tokens; nsplit = block rows along tokens (= workspace rows per batch row).
    chan_blocks = cdiv(s.dim, 32 * (x.element_size() == 8 ? 2 : 4));
    // deep/fused: runs rounded to 4 tokens (their chunk) instead of 8: at b1 L8192 C4096 the longest run
    // drops from 176 to 172 tokens (48 runs of 170.7 would be exact).
    const bool wide = p.bwd_impl == kFwdWide;  // one run per block row, 4x the channels per block
    const int64_t runs_per_block = wide ? 1 : 4;
    const int64_t chunk = (p.bwd_impl == kFwdDeep || p.bwd_impl == kBwdFused || wide) ? 4 : 8;
    if (wide) chan_blocks = cdiv(chan_blocks, 4);
    const int64_t target = 3 * int64_t(num_sms(x));
    int64_t rows = std::clamp<int64_t>(target / (chan_blocks * s.batch), 1, cdiv(s.seqlen, runs_per_block * chunk));
    const int64_t run_len = cdiv(cdiv(s.seqlen, rows * runs_per_block), chunk) * chunk;
    rows = cdiv(cdiv(s.seqlen, run_len), runs_per_block);
    TORCH_CHECK(rows <= 65535, "x: seqlen too long for the backward grid");
    return launch(rows, run_len);
  }
  p.chan_vec = !p.vectorized && chan_vec_from_env() && chan_vectorizable(x) && chan_vectorizable(dout) &&
               chan_vectorizable(dx);
  if (p.chan_vec) {
    // Channel-major vector backward: one block per (b, c) row and token tile; one partial row per tile.
    const int64_t tiles = cdiv(s.seqlen, int64_t(kCmTileVecs) * (16 / x.element_size()));
    TORCH_CHECK(tiles <= 65535, "x: seqlen too long for the backward grid");
    return launch(tiles, int64_t(kCmTileVecs) * (16 / x.element_size()));
  }
  if (p.vectorized) {
    chan_blocks = cdiv(s.dim, 32 * (x.element_size() == 8 ? 2 : 4));
    tile = 4 * 8;  // 4 token lanes x kBwdTok
    target_blocks = (x.element_size() == 2 ? 3 : 2) * int64_t(num_sms(x));
  } else {
    chan_blocks = cdiv(s.dim, p.tok_fast ? 8 : 32);
    tile = p.tok_fast ? 32 : 8;
    target_blocks = 4 * int64_t(num_sms(x));
  }
  const int64_t max_splits = cdiv(s.seqlen, tile);
  int64_t nsplit = std::clamp<int64_t>(target_blocks / (chan_blocks * s.batch), 1, max_splits);
  const int64_t split_len = cdiv(cdiv(s.seqlen, nsplit), tile) * tile;
  nsplit = cdiv(s.seqlen, split_len);
  TORCH_CHECK(nsplit <= 65535, "x: seqlen too long for the backward grid");
  return launch(nsplit, split_len);
}

// -------------------------------------------------------------------------------------------- update
Tensor causal_conv1d_update(const Tensor& x, Tensor& conv_state, const Tensor& weight,
                            const std::optional<Tensor>& bias, bool silu,
                            const std::optional<Tensor>& conv_state_indices) {
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "x: expected 3 dims (batch, dim, q), got shape ", x.sizes());
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "x: expected dtype float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
  const int64_t batch = x.size(0), dim = x.size(1), q = x.size(2);
  TORCH_CHECK(q >= 1, "x: expected q (dim 2) >= 1 new tokens, got ", q);
  check_float_tensor(weight, "weight", x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == dim, "weight: expected shape (dim, width) with dim = ", dim,
              ", got ", weight.sizes());
  const int64_t width = weight.size(1);
  TORCH_CHECK(width >= 2 && width <= 4, "weight: expected width (dim 1) in 2..4, got ", width);
  if (bias.has_value()) {
    check_float_tensor(*bias, "bias", x);
    check_shape(*bias, "bias", {dim}, "(dim,)");
  }
  check_float_tensor(conv_state, "conv_state", x);
  TORCH_CHECK(conv_state.dim() == 3 && conv_state.size(1) == dim,
              "conv_state: expected shape (slots, dim, state_len) with dim = ", dim, ", got ", conv_state.sizes());
  TORCH_CHECK(conv_state.size(2) >= width - 1, "conv_state: expected state_len (dim 2) >= width - 1 = ", width - 1,
              ", got ", conv_state.size(2));
  if (conv_state_indices.has_value()) {
    const Tensor& idx = *conv_state_indices;
    TORCH_CHECK(idx.is_cuda() && idx.device() == x.device(), "conv_state_indices: expected a CUDA tensor on ",
                x.device(), ", got ", idx.device());
    TORCH_CHECK(idx.scalar_type() == at::kInt, "conv_state_indices: expected dtype int32, got ", idx.scalar_type());
    check_shape(idx, "conv_state_indices", {batch}, "(batch,)");
  } else {
    TORCH_CHECK(conv_state.size(0) >= batch, "conv_state: expected at least batch = ", batch,
                " slots when conv_state_indices is None, got ", conv_state.size(0));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = torch::empty({batch, dim, q}, x.options());
  if (batch == 0 || dim == 0) return out;
  UpdateParams p;
  std::memset(&p, 0, sizeof(p));
  p.batch = int(batch);
  p.dim = int(dim);
  p.seqlen = int(q);
  p.width = int(width);
  p.state_len = int(conv_state.size(2));
  p.slots = int(conv_state.size(0));
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_stride_b = x.stride(0);
  p.x_stride_c = x.stride(1);
  p.x_stride_l = x.stride(2);
  p.out = out.data_ptr();
  p.conv_state = conv_state.data_ptr();
  p.state_stride_b = conv_state.stride(0);
  p.state_stride_c = conv_state.stride(1);
  p.state_stride_k = conv_state.stride(2);
  p.state_dtype = scalar_code(conv_state.scalar_type());
  if (conv_state_indices.has_value()) {
    p.slot_idx = conv_state_indices->data_ptr<int32_t>();
    p.slot_stride = conv_state_indices->stride(0);
  }
  p.weight = weight.data_ptr();
  p.weight_stride_c = weight.stride(0);
  p.weight_stride_k = weight.stride(1);
  p.weight_dtype = scalar_code(weight.scalar_type());
  if (bias.has_value()) {
    p.bias = bias->data_ptr();
    p.bias_stride = bias->stride(0);
    p.bias_dtype = scalar_code(bias->scalar_type());
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  APRIEL_CONV1D_DISPATCH(x.scalar_type(), causal_conv1d_update, p, stream);
  return out;
}

}  // namespace
}  // namespace conv1d
}  // namespace apriel

TORCH_LIBRARY_FRAGMENT(apriel_C, m) {
  // (out in x's layout, final_states (batch, dim, width-1) or empty)
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, Tensor? initial_states, "
        "bool return_final_states, bool silu) -> (Tensor, Tensor)");
  // (dx in x's layout, dweight fp32, dbias fp32 or empty, dinitial_states or empty); deterministic
  m.def("causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, Tensor? initial_states, "
        "Tensor dout, Tensor? dfinal_states, bool silu) -> (Tensor, Tensor, Tensor, Tensor)");
  // out (batch, dim, q); conv_state advanced by q tokens in place; slot -1 = padding row
  m.def("causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu, "
        "Tensor? conv_state_indices) -> Tensor");
}

TORCH_LIBRARY_IMPL(apriel_C, CUDA, m) {
  m.impl("causal_conv1d_fwd", &apriel::conv1d::causal_conv1d_fwd);
  m.impl("causal_conv1d_bwd", &apriel::conv1d::causal_conv1d_bwd);
  m.impl("causal_conv1d_update", &apriel::conv1d::causal_conv1d_update);
}
