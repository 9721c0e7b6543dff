// Host side of the fused decode step: argument checks (each error names the argument and what was
// expected), params filling, dispatch by activation dtype, and the op schemas. Kernel: step_kernel.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>  // CUtensorMap and its enums only: the encoder comes from cudaGetDriverEntryPointByVersion (no libcuda link)
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <unordered_map>

#include "step_params.h"

namespace {

using apriel::step::MixerStepParams;

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return apriel::step::kFloat16;
    case at::kBFloat16: return apriel::step::kBFloat16;
    case at::kFloat: return apriel::step::kFloat32;
    case at::kDouble: return apriel::step::kFloat64;
    default: TORCH_CHECK(false, name, ": expected a floating dtype (float16, bfloat16, float32, float64), got ", t.scalar_type());
  }
  return 0;
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, ": expected a tensor on ", ref.device(),
              " (like zxbc), got ", t.device());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, name, ": expected shape ", want, ", got ", t.sizes());
}

// Kernel version: 2 (step_kernel_v2.cuh, the default), 1 (step_kernel.cuh) with APRIEL_STEP_KERNEL=v1, or
// 3 (step_kernel_v3.cuh, opt-in until measured) with APRIEL_STEP_KERNEL=v3, so one benchmark run can
// compare them (bench/kernels_step.py, providers "apriel[v1]", "apriel[v3]").
// Default by batch (H100, session 3 after the instruction diet, bench/results/s3/conv1d_step_diet_bench.log, fp32
// state, cold): v3 (TMA-staged state, parameters once per warp) wins from b64 (20.81 vs 21.40 us; bf16 state
// 15.67 vs 18.99; with PDL 18.72 vs 19.33) and at b256 (63.75); v2 wins below (b16 7.62 vs 7.98, b1 4.34 vs 5.27).
int kernel_version(int64_t batch) {
  const char* env = std::getenv("APRIEL_STEP_KERNEL");
  if (env == nullptr) return batch >= 64 ? 3 : 2;
  const std::string v(env);
  return v == "v1" ? 1 : v == "v3" ? 3 : 2;
}

// v3 covers the common decode call only: q = 1, fp16/bf16 activations, sm_90 (TMA bulk copies);
// anything else runs v2 (same results up to the order of the C readout sum).
bool v3_supported(int64_t q, at::ScalarType act, const at::Tensor& like) {
  if (q != 1 || act == at::kFloat) return false;
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, like.device().index()) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major >= 9;
}

// v3 sequences per warp: 0 = the launcher's choice (at most 8 rows per warp in the fewest full waves, launch_state);
// APRIEL_STEP_V3_SEQ (1..32) forces it (benchmark sweeps, tests of the stage ring).
int v3_seq_per_warp() {
  if (const char* env = std::getenv("APRIEL_STEP_V3_SEQ")) {
    const int v = std::atoi(env);
    if (v >= 1 && v <= 32) return v;
  }
  return 0;
}

// v3 state ring depth per warp: 4 (default) or 8 with APRIEL_STEP_V3_STAGES=8 (twice the rows in flight per warp,
// 3 instead of 4 resident 4-warp blocks per SM with fp32 state; an A/B for the DRAM-latency-bound batches).
int v3_stages() {
  const char* env = std::getenv("APRIEL_STEP_V3_STAGES");
  return env != nullptr && std::string(env) == "8" ? 8 : 4;
}

// An on/off switch read at each call (so one benchmark run can A/B a path): unset = `default_on`; a switch that
// defaults on is turned off only by "0", one that defaults off is turned on only by "1".
bool env_switch(const char* name, bool default_on) {
  const char* env = std::getenv(name);
  if (env == nullptr) return default_on;
  return default_on ? std::string(env) != "0" : std::string(env) == "1";
}

// v3 state copies: one 3-D TMA tensor copy per row and direction (APRIEL_STEP_V3_TMA=1, the default) or r per-lane
// cp.async.bulk chunks (APRIEL_STEP_V3_TMA=0, the session-3 path). Same bytes, same shared layout, same math:
// the tensor map only removes the serialized per-lane copy issues (~90 of ~600 warp instructions per row).
bool v3_tma_requested() { return env_switch("APRIEL_STEP_V3_TMA", true); }

// v3 conv-cache rows staged with the state by the TMA (APRIEL_STEP_V3_CONV_STAGE=1, the default; 0 = the register
// prefetch one row ahead). Applies with the tensor map only (see v3_conv_stage_applies).
bool v3_conv_stage_requested() { return env_switch("APRIEL_STEP_V3_CONV_STAGE", true); }

// The layout rules of the staged conv rows: a warp's w = 32 / r rows of S entries must be one contiguous, 16-byte
// aligned run of a multiple of 16 bytes (cp.async.bulk), in a compact cache of the 16-bit activation dtype.
bool v3_conv_stage_applies(const at::Tensor& conv, const at::Tensor& zxbc, int64_t d_inner, int64_t d_xb) {
  const int64_t S = conv.size(2), w = 32 / (d_inner / d_xb);
  return conv.scalar_type() == zxbc.scalar_type() && conv.element_size() == 2 && conv.size(1) == d_xb && S <= 4 &&
         conv.stride(2) == 1 && conv.stride(1) == S && (conv.stride(0) * 2) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(conv.data_ptr()) % 16 == 0 && (w * S * 2) % 16 == 0 && w * S * 2 <= 256;
}

// v3 state stores from registers straight to the cache (APRIEL_STEP_V3_DIRECT_STORE=1) or through the stage and a
// TMA store (0, the default).
bool v3_direct_store() { return env_switch("APRIEL_STEP_V3_DIRECT_STORE", false); }

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver the runtime already loaded; nullptr if unavailable (-> per-lane copies).
EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = []() -> EncodeTiledFn {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// The v3 tensor map over the SSM cache (slots, D/16, 16, 16): dims (innermost first) {256 elements = one block of
// 16 channels x 16 states, D / 16 blocks, slots}, strides {256 elements, slot stride} in bytes, box = one warp's
// 32 channels {16 min(w, 16), 32 / min(w, 16), 1} with w = 32 / r source channels per warp: r chunks of w channels
// at a stride of one block (r >= 2), or two whole blocks (r = 1). The kernel's coordinates are
// ((x0 % 16) * 16, (x0 / 16) * r, slot) for the warp's first source channel x0. Returns false (-> per-lane
// copies) when a TMA rule fails: a partial last warp (X % w != 0), an empty cache, a stride out of range, or no
// encoder. The caller has checked a 16-byte aligned base and slot stride (TMA: 16-byte aligned address and
// strides; the inner box extent, 16 min(w, 16) elements of 2 or 4 bytes, is a multiple of 16 bytes).
bool encode_state_map(const at::Tensor& ssm, int64_t d_inner, int64_t d_xb, unsigned char* out) {
  const int64_t r = d_inner / d_xb, w = 32 / r, bw = w < 16 ? w : 16;
  const int64_t es = ssm.element_size(), slots = ssm.size(0), slot_bytes = ssm.stride(0) * es;
  if (d_xb % w != 0 || slots < 1 || slots > (int64_t(1) << 32) || slot_bytes >= (int64_t(1) << 40)) return false;
  // Maps by (cache pointer, geometry): eager decode calls every layer (one SSM cache each) every step; the encode
  // is pure host work that a graph replay never repeats, but eager calls would pay it per layer and step. A map
  // depends only on the key, so a stale entry for a freed and reallocated pointer is still the right map.
  struct Key {
    const void* ptr; int64_t slots, slot_bytes, d_inner, d_xb, es;
    bool operator==(const Key& o) const { return std::memcmp(this, &o, sizeof(Key)) == 0; }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const { return std::hash<const void*>()(k.ptr) ^ std::hash<int64_t>()(k.slots * 31 + k.es); }
  };
  struct Map { unsigned char bytes[128]; };
  thread_local std::unordered_map<Key, Map, KeyHash> cache;
  const Key key{ssm.data_ptr(), slots, slot_bytes, d_inner, d_xb, es};
  if (const auto it = cache.find(key); it != cache.end()) {
    std::memcpy(out, it->second.bytes, sizeof(it->second.bytes));
    return true;
  }
  const EncodeTiledFn encode = encode_tiled();
  if (encode == nullptr) return false;
  static_assert(sizeof(CUtensorMap) == 128, "MixerStepParams::v3_state_map holds one CUtensorMap");
  CUtensorMap map;
  const cuuint64_t dims[3] = {256, static_cast<cuuint64_t>(d_inner / 16), static_cast<cuuint64_t>(slots)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(256 * es), static_cast<cuuint64_t>(slot_bytes)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(bw * 16), static_cast<cuuint32_t>(32 / bw), 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult res = encode(&map, es == 4 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3,
                              ssm.data_ptr(), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                              CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) return false;
  if (cache.size() >= 1024) cache.clear();  // bounded: a long-lived process that keeps reallocating caches
  std::memcpy(cache[key].bytes, &map, sizeof(map));
  std::memcpy(out, &map, sizeof(map));
  return true;
}

// Programmatic dependent launch for v2 / v3 (APRIEL_STEP_PDL=1; off by default: the kernel then reads the
// layer parameters before the previous kernel has finished, which is only safe when that kernel does not
// write them - true in a decode graph, not something a general op may assume).
bool use_pdl() { return env_switch("APRIEL_STEP_PDL", false); }

// Sequences per thread. v1: the staged parameters are shared by more sequences per block; small batches
// keep one per thread to fill the SMs. Measured on the H100 (bench/results/step_h100.json, fp32 state,
// cold L2): b16 1/2/4 = 11.6/13.5/20.0 us, b64 31.7/31.3/27.3 us, b256 100.6/87.5/81.8 us.
// v2: 1 at every batch, as measured on the H100 (bench/results/s2/combined1_bench.log, fp32 state, cold L2,
// seq 1/2/4): b16 7.99/8.48/11.02 us, b64 22.61/24.33/24.24 us, b256 78.30/78.40/85.51 us (2 and 4 only
// cost registers; fp32 inputs also spill with them). v2 with q > 1 always uses 1.
// APRIEL_STEP_SEQ_PER_THREAD (1, 2, 4) overrides the choice (benchmark sweeps).
int seq_per_thread(int batch, int version, int q, bool act_fp32) {
  if (version == 2 && q > 1) return 1;
  if (const char* env = std::getenv("APRIEL_STEP_SEQ_PER_THREAD")) {
    const int v = std::atoi(env);
    if (v == 1 || v == 2 || v == 4) return v;
  }
  if (version == 2) return 1;
  return batch >= 64 ? 4 : 1;
}

void mixer_step_out(const at::Tensor& zxbc, const at::Tensor& dt_low, at::Tensor& conv_state, at::Tensor& ssm_state,
                    const std::optional<at::Tensor>& slot_idx, const at::Tensor& conv_weight,
                    const std::optional<at::Tensor>& conv_bias, const at::Tensor& dt_proj_weight,
                    const at::Tensor& dt_proj_bias, const at::Tensor& A_log, const at::Tensor& D, int64_t d_inner,
                    int64_t d_xb, int64_t d_state, bool repeat_kv_before_conv, at::Tensor& out) {
  using namespace apriel::step;
  TORCH_CHECK(d_state == kDState, "d_state: the CUDA step kernel supports d_state = ", kDState, ", got ", d_state);
  TORCH_CHECK(d_xb > 0 && d_xb % d_state == 0, "d_xb: expected a positive multiple of d_state (", d_state, "), got ", d_xb);
  TORCH_CHECK(d_inner > 0 && d_inner % d_xb == 0, "d_inner: expected a positive multiple of d_xb (", d_xb, "), got ", d_inner);
  TORCH_CHECK(16 % (d_inner / d_xb) == 0, "d_inner / d_xb: expected a divisor of 16 (one x/B group of 16*r channels "
              "per 256-thread block), got ", d_inner / d_xb);
  TORCH_CHECK(zxbc.is_cuda(), "zxbc: expected a CUDA tensor, got ", zxbc.device());
  const auto act = zxbc.scalar_type();
  TORCH_CHECK(act == at::kHalf || act == at::kBFloat16 || act == at::kFloat,
              "zxbc: expected dtype float16, bfloat16 or float32, got ", act);
  TORCH_CHECK(zxbc.dim() == 3 && zxbc.size(2) == 2 * d_inner + 2 * d_xb, "zxbc: expected (batch, q, 2*d_inner + 2*d_xb = ",
              2 * d_inner + 2 * d_xb, "), got ", zxbc.sizes());
  TORCH_CHECK(zxbc.stride(2) == 1, "zxbc: expected unit stride in the last dim, got strides ", zxbc.strides());
  const int64_t batch = zxbc.size(0), q = zxbc.size(1);
  check_device(dt_low, "dt_low", zxbc);
  TORCH_CHECK(dt_low.scalar_type() == act, "dt_low: expected dtype ", act, " (like zxbc), got ", dt_low.scalar_type());
  TORCH_CHECK(dt_low.dim() == 3 && dt_low.size(0) == batch && dt_low.size(1) == q,
              "dt_low: expected (batch = ", batch, ", q = ", q, ", dt_rank), got ", dt_low.sizes());
  TORCH_CHECK(dt_low.stride(2) == 1 || dt_low.size(2) == 1, "dt_low: expected unit stride in the last dim, got strides ", dt_low.strides());
  const int64_t dt_rank = dt_low.size(2);
  TORCH_CHECK(dt_rank >= 1, "dt_low: expected dt_rank >= 1, got ", dt_rank);

  const int64_t conv_channels = repeat_kv_before_conv ? d_inner : d_xb;
  check_device(conv_weight, "conv_weight", zxbc);
  TORCH_CHECK(conv_weight.dim() == 2 && conv_weight.size(0) == conv_channels && conv_weight.size(1) >= 2 && conv_weight.size(1) <= 4,
              "conv_weight: expected (", conv_channels, ", width in 2..4), got ", conv_weight.sizes());
  const int64_t width = conv_weight.size(1);
  if (conv_bias.has_value()) {
    check_device(*conv_bias, "conv_bias", zxbc);
    check_shape(*conv_bias, "conv_bias", {conv_channels});
  }
  check_device(dt_proj_weight, "dt_proj_weight", zxbc);
  check_shape(dt_proj_weight, "dt_proj_weight", {d_inner, dt_rank});
  check_device(dt_proj_bias, "dt_proj_bias", zxbc);
  check_shape(dt_proj_bias, "dt_proj_bias", {d_inner});
  check_device(A_log, "A_log", zxbc);
  check_shape(A_log, "A_log", {d_inner, d_state});
  check_device(D, "D", zxbc);
  check_shape(D, "D", {d_inner});

  check_device(conv_state, "conv_state", zxbc);
  TORCH_CHECK(conv_state.dim() == 3, "conv_state: expected (slots, channels, state_len), got ", conv_state.sizes());
  const int64_t cs_channels = conv_state.size(1);
  TORCH_CHECK(cs_channels == d_xb || (repeat_kv_before_conv && cs_channels == d_inner), "conv_state: expected ",
              repeat_kv_before_conv ? "d_xb or d_inner" : "d_xb", " channels in dim 1, got ", conv_state.sizes());
  TORCH_CHECK(conv_state.size(2) >= width - 1, "conv_state: expected state_len (dim 2) >= width - 1 = ", width - 1,
              ", got ", conv_state.size(2));
  check_device(ssm_state, "ssm_state", zxbc);
  const bool state_bf16 = ssm_state.scalar_type() == at::kBFloat16;
  TORCH_CHECK(state_bf16 || ssm_state.scalar_type() == at::kFloat, "ssm_state: expected dtype float32 or bfloat16, got ",
              ssm_state.scalar_type());
  TORCH_CHECK(ssm_state.dim() == 4 && ssm_state.size(1) == d_inner / d_state && ssm_state.size(2) == d_state &&
                  ssm_state.size(3) == d_state,
              "ssm_state: expected (slots, ", d_inner / d_state, ", ", d_state, ", ", d_state, "), got ", ssm_state.sizes());
  TORCH_CHECK(ssm_state.stride(3) == 1 && ssm_state.stride(2) == d_state && ssm_state.stride(1) == d_state * d_state,
              "ssm_state: expected each slot contiguous (strides (*, ", d_state * d_state, ", ", d_state, ", 1)), got ",
              ssm_state.strides());
  const int64_t vec_bytes = 16;  // a channel's states are read as 16-byte vectors
  TORCH_CHECK(reinterpret_cast<uintptr_t>(ssm_state.data_ptr()) % vec_bytes == 0 &&
                  (ssm_state.stride(0) * ssm_state.element_size()) % vec_bytes == 0,
              "ssm_state: expected a ", vec_bytes, "-byte aligned data pointer and slot stride, got pointer ",
              ssm_state.data_ptr(), " and slot stride ", ssm_state.stride(0));
  const int64_t slots = ssm_state.size(0);
  TORCH_CHECK(conv_state.size(0) == slots, "conv_state: expected ", slots, " slots (like ssm_state), got ", conv_state.size(0));
  if (slot_idx.has_value()) {
    check_device(*slot_idx, "slot_idx", zxbc);
    TORCH_CHECK(slot_idx->scalar_type() == at::kInt, "slot_idx: expected dtype int32, got ", slot_idx->scalar_type());
    TORCH_CHECK(slot_idx->dim() == 1 && slot_idx->size(0) == batch && (slot_idx->stride(0) == 1 || batch <= 1),
                "slot_idx: expected a contiguous (batch = ", batch, ",) tensor, got ", slot_idx->sizes(), " strides ",
                slot_idx->strides());
  } else {
    TORCH_CHECK(slots >= batch, "ssm_state: expected at least batch = ", batch, " slots when slot_idx is None, got ", slots);
  }

  check_device(out, "out", zxbc);
  TORCH_CHECK(out.scalar_type() == act, "out: expected dtype ", act, " (like zxbc), got ", out.scalar_type());
  check_shape(out, "out", {batch, q, d_inner});
  TORCH_CHECK(out.stride(2) == 1, "out: expected unit stride in the last dim, got strides ", out.strides());
  TORCH_CHECK(batch <= 65535, "zxbc: expected batch <= 65535 (one launch), got ", batch);
  if (batch == 0 || q == 0) return;

  MixerStepParams p{};
  p.batch = static_cast<int>(batch);
  p.q = static_cast<int>(q);
  p.d_inner = static_cast<int>(d_inner);
  p.d_xb = static_cast<int>(d_xb);
  p.dt_rank = static_cast<int>(dt_rank);
  p.width = static_cast<int>(width);
  p.conv_state_len = static_cast<int>(conv_state.size(2));
  p.conv_state_channels = static_cast<int>(cs_channels);
  p.repeat_kv_before_conv = repeat_kv_before_conv;
  p.zxbc = zxbc.data_ptr();
  p.zxbc_batch_stride = zxbc.stride(0);
  p.zxbc_token_stride = zxbc.stride(1);
  p.dt_low = dt_low.data_ptr();
  p.dt_batch_stride = dt_low.stride(0);
  p.dt_token_stride = dt_low.stride(1);
  p.y = out.data_ptr();
  p.y_batch_stride = out.stride(0);
  p.y_token_stride = out.stride(1);
  p.slot_idx = slot_idx.has_value() ? slot_idx->data_ptr<int32_t>() : nullptr;
  p.num_slots = static_cast<int>(slots);
  p.conv_state = conv_state.data_ptr();
  p.conv_state_dtype = dtype_code(conv_state, "conv_state");
  p.conv_slot_stride = conv_state.stride(0);
  p.conv_channel_stride = conv_state.stride(1);
  p.conv_pos_stride = conv_state.stride(2);
  p.ssm_state = ssm_state.data_ptr();
  p.ssm_slot_stride = ssm_state.stride(0);
  p.conv_weight = conv_weight.data_ptr();
  p.conv_weight_dtype = dtype_code(conv_weight, "conv_weight");
  p.conv_weight_stride0 = conv_weight.stride(0);
  p.conv_weight_stride1 = conv_weight.stride(1);
  p.conv_bias = conv_bias.has_value() ? conv_bias->data_ptr() : nullptr;
  p.conv_bias_dtype = conv_bias.has_value() ? dtype_code(*conv_bias, "conv_bias") : kFloat32;
  p.conv_bias_stride = conv_bias.has_value() ? conv_bias->stride(0) : 0;
  p.dt_proj_weight = dt_proj_weight.data_ptr();
  p.dt_proj_weight_dtype = dtype_code(dt_proj_weight, "dt_proj_weight");
  p.dt_proj_weight_stride0 = dt_proj_weight.stride(0);
  p.dt_proj_weight_stride1 = dt_proj_weight.stride(1);
  p.dt_proj_bias = dt_proj_bias.data_ptr();
  p.dt_proj_bias_dtype = dtype_code(dt_proj_bias, "dt_proj_bias");
  p.dt_proj_bias_stride = dt_proj_bias.stride(0);
  p.A_log = A_log.data_ptr();
  p.A_log_dtype = dtype_code(A_log, "A_log");
  p.A_log_stride0 = A_log.stride(0);
  p.A_log_stride1 = A_log.stride(1);
  p.D_skip = D.data_ptr();
  p.D_skip_dtype = dtype_code(D, "D");
  p.D_skip_stride = D.stride(0);
  int version = kernel_version(p.batch);
  if (version == 3 && !v3_supported(q, act, zxbc)) version = 2;
  p.v3_seq_per_warp = version == 3 ? v3_seq_per_warp() : 0;
  p.v3_stages = version == 3 ? v3_stages() : 4;
  p.v3_tma = version == 3 && v3_tma_requested() && encode_state_map(ssm_state, d_inner, d_xb, p.v3_state_map);
  p.v3_direct_store = version == 3 && v3_direct_store();
  p.v3_conv_stage = p.v3_tma && p.v3_stages == 4 && v3_conv_stage_requested() &&
                    v3_conv_stage_applies(conv_state, zxbc, d_inner, d_xb);
  p.seq_per_thread = seq_per_thread(p.batch, version, p.q, act == at::kFloat);
  p.pdl = version >= 2 && use_pdl();
  p.group_channels = static_cast<int>(d_state * (d_inner / d_xb));
  const int64_t esize = zxbc.element_size();
  p.vec_inputs = reinterpret_cast<uintptr_t>(zxbc.data_ptr()) % 16 == 0 && (zxbc.stride(0) * esize) % 16 == 0 &&
                 (q == 1 || (zxbc.stride(1) * esize) % 16 == 0);
  p.vec_A = A_log.scalar_type() == at::kFloat && A_log.stride(1) == 1 && (A_log.stride(0) * 4) % 16 == 0 &&
            reinterpret_cast<uintptr_t>(A_log.data_ptr()) % 16 == 0;
  const auto wdt = dt_proj_weight.scalar_type();
  p.vec_dtw = dt_rank == 16 && (wdt == at::kFloat || wdt == at::kHalf || wdt == at::kBFloat16) &&
              dt_proj_weight.stride(1) == 1 && (dt_proj_weight.stride(0) * dt_proj_weight.element_size()) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(dt_proj_weight.data_ptr()) % 16 == 0;
  p.vec_dt = dt_rank == 16 && reinterpret_cast<uintptr_t>(dt_low.data_ptr()) % 16 == 0 &&
             (dt_low.stride(0) * esize) % 16 == 0 && (q == 1 || (dt_low.stride(1) * esize) % 16 == 0);

  const c10::cuda::CUDAGuard guard(zxbc.device());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  if (version == 1) {
    switch (act) {
      case at::kHalf: launch_mixer_step_fp16(p, state_bf16, stream); break;
      case at::kBFloat16: launch_mixer_step_bf16(p, state_bf16, stream); break;
      default: launch_mixer_step_fp32(p, state_bf16, stream); break;
    }
  } else if (version == 3) {
    if (act == at::kHalf) {
      launch_mixer_step_v3_fp16(p, state_bf16, stream);
    } else {
      launch_mixer_step_v3_bf16(p, state_bf16, stream);
    }
  } else {
    switch (act) {
      case at::kHalf: launch_mixer_step_v2_fp16(p, state_bf16, stream); break;
      case at::kBFloat16: launch_mixer_step_v2_bf16(p, state_bf16, stream); break;
      default: launch_mixer_step_v2_fp32(p, state_bf16, stream); break;
    }
  }
}

at::Tensor mixer_step(const at::Tensor& zxbc, const at::Tensor& dt_low, at::Tensor& conv_state, at::Tensor& ssm_state,
                      const std::optional<at::Tensor>& slot_idx, const at::Tensor& conv_weight,
                      const std::optional<at::Tensor>& conv_bias, const at::Tensor& dt_proj_weight,
                      const at::Tensor& dt_proj_bias, const at::Tensor& A_log, const at::Tensor& D, int64_t d_inner,
                      int64_t d_xb, int64_t d_state, bool repeat_kv_before_conv) {
  TORCH_CHECK(zxbc.dim() == 3, "zxbc: expected (batch, q, 2*d_inner + 2*d_xb), got ", zxbc.sizes());
  at::Tensor out = at::empty({zxbc.size(0), zxbc.size(1), d_inner}, zxbc.options());
  mixer_step_out(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias,
                 A_log, D, d_inner, d_xb, d_state, repeat_kv_before_conv, out);
  return out;
}

// Which of v3's TMA paths the layouts allow, whatever the switches (tests: each path really runs where it should,
// and the fallback where a rule fails): bit 0 = the SSM cache's tensor map encodes, bit 1 = the conv rows can be
// staged as well. Same functions as the launch path; no device work.
int64_t mixer_step_v3_paths(const at::Tensor& zxbc, const at::Tensor& conv_state, const at::Tensor& ssm_state,
                            int64_t d_inner, int64_t d_xb) {
  TORCH_CHECK(ssm_state.dim() == 4 && conv_state.dim() == 3 && d_xb > 0 && d_inner % d_xb == 0 && d_inner / d_xb <= 16,
              "ssm_state / conv_state: expected (slots, d_inner / 16, 16, 16) / (slots, channels, S) with d_inner a "
              "multiple of d_xb, got ", ssm_state.sizes(), " / ", conv_state.sizes());
  unsigned char map[128];
  const bool tma = encode_state_map(ssm_state, d_inner, d_xb, map);
  return (tma ? 1 : 0) | (tma && v3_conv_stage_applies(conv_state, zxbc, d_inner, d_xb) ? 2 : 0);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(apriel_C, m) {
  // Fused decode step (q >= 1 tokens per sequence): returns y (b, q, D); both caches updated in place.
  m.def(
      "mixer_step(Tensor zxbc, Tensor dt_low, Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor? slot_idx, "
      "Tensor conv_weight, Tensor? conv_bias, Tensor dt_proj_weight, Tensor dt_proj_bias, Tensor A_log, Tensor D, "
      "int d_inner, int d_xb, int d_state, bool repeat_kv_before_conv) -> Tensor");
  // The same step writing y into `out` (no allocation: for CUDA graphs).
  m.def(
      "mixer_step_out(Tensor zxbc, Tensor dt_low, Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor? slot_idx, "
      "Tensor conv_weight, Tensor? conv_bias, Tensor dt_proj_weight, Tensor dt_proj_bias, Tensor A_log, Tensor D, "
      "int d_inner, int d_xb, int d_state, bool repeat_kv_before_conv, Tensor(c!) out) -> ()");
  // Test hook: which TMA paths of kernel v3 these caches allow (bit 0: state tensor map, bit 1: staged conv rows).
  m.def("mixer_step_v3_paths(Tensor zxbc, Tensor conv_state, Tensor ssm_state, int d_inner, int d_xb) -> int");
}

TORCH_LIBRARY_IMPL(apriel_C, CUDA, m) {
  m.impl("mixer_step", &mixer_step);
  m.impl("mixer_step_out", &mixer_step_out);
  m.impl("mixer_step_v3_paths", &mixer_step_v3_paths);
}
