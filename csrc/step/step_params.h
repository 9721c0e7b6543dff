// Parameters of the fused decode step (apriel_C::mixer_step): raw pointers + element strides, filled by
// step_api.cpp (torch side) and read by step_kernel.cuh (CUDA side). No torch types here, so the .cu
// files that include it compile in seconds.
#pragma once
#include <cstdint>

namespace apriel {
namespace step {

// Storage dtype of a tensor whose dtype is a runtime property (parameters, conv cache). The activation
// and SSM-state dtypes are template parameters instead: they sit in the inner loop.
enum DTypeCode : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

struct MixerStepParams {
  // Sizes (mixer.md section 2): D = d_inner, X = d_xb, N = d_state (16), R = dt_rank, W = d_conv.
  int batch;
  int q;  // tokens per sequence in this call (speculative decoding: q > 1)
  int d_inner;
  int d_xb;
  int dt_rank;
  int width;
  int conv_state_len;       // S >= W - 1
  int conv_state_channels;  // X (compact layout) or D (the reference checkpoints' layout)
  bool repeat_kv_before_conv;

  // Activations, element strides; the channel dim has unit stride.
  const void* zxbc;  // (batch, q, 2D + 2X): z | x | B | C
  int64_t zxbc_batch_stride, zxbc_token_stride;
  const void* dt_low;  // (batch, q, R)
  int64_t dt_batch_stride, dt_token_stride;
  void* y;  // (batch, q, D) in the activation dtype
  int64_t y_batch_stride, y_token_stride;

  // Caches, updated in place. slot_idx[i] = cache row of sequence i, -1 = padding; nullptr = identity.
  // A slot outside [0, num_slots) is treated as padding: the range check of the Python layer needs a
  // host sync, so it is skipped under CUDA-graph capture, and the kernel must stay in bounds anyway.
  const int32_t* slot_idx;
  int num_slots;
  void* conv_state;  // (slots, X or D, S), any strides
  int conv_state_dtype;
  int64_t conv_slot_stride, conv_channel_stride, conv_pos_stride;
  void* ssm_state;  // (slots, D/N, N, N); each slot's D*N block contiguous, 16-byte aligned
  int64_t ssm_slot_stride;

  // Layer parameters (read once per block; any float dtype, any strides).
  const void* conv_weight;  // (Cc, W), Cc = D if repeat_kv_before_conv else X
  int conv_weight_dtype;
  int64_t conv_weight_stride0, conv_weight_stride1;
  const void* conv_bias;  // (Cc,) or nullptr
  int conv_bias_dtype;
  int64_t conv_bias_stride;
  const void* dt_proj_weight;  // (D, R)
  int dt_proj_weight_dtype;
  int64_t dt_proj_weight_stride0, dt_proj_weight_stride1;
  const void* dt_proj_bias;  // (D,)
  int dt_proj_bias_dtype;
  int64_t dt_proj_bias_stride;
  const void* A_log;  // (D, N)
  int A_log_dtype;
  int64_t A_log_stride0, A_log_stride1;
  const void* D_skip;  // (D,)
  int D_skip_dtype;
  int64_t D_skip_stride;

  int seq_per_thread;  // sequences per thread, 1, 2 or 4 (parameters are staged once per block)
  int group_channels;  // 16 * r channels of one x/B group (r = D / X divides 16)
  bool vec_inputs;     // zxbc rows 16-byte aligned: B and C groups are read as 16-byte vectors
  bool vec_A;          // v2: A_log fp32 with 16-byte aligned unit-stride rows: read as float4
  bool vec_dtw;        // v2: dt_proj_weight fp16/bf16/fp32, dt_rank 16, 16-byte aligned unit-stride rows
  bool vec_dt;         // v2: dt_rank 16 and dt_low rows 16-byte aligned: read as 16-byte vectors
  bool pdl;            // v2/v3: launch with programmatic dependent launch (APRIEL_STEP_PDL=1, sm_90)
  int v3_seq_per_warp; // v3: sequences per warp, 0 = chosen by the launcher (APRIEL_STEP_V3_SEQ forces 1..32)
  int v3_stages;       // v3: state ring depth per warp, 4 (default) or 8 (APRIEL_STEP_V3_STAGES=8)
  // v3: move a warp's state slice with ONE 3-D TMA tensor copy per row and direction (APRIEL_STEP_V3_TMA, set by
  // the host only when the map below was encoded and X is a multiple of the warp's source channels); false =
  // the per-lane cp.async.bulk chunks. The map (a CUtensorMap, opaque here so this header needs no cuda.h)
  // views the state cache as dims (innermost first) {256 elements = 16 channels x 16 states, D / 16 channel
  // blocks, slots}; box {16 min(w, 16), 32 / min(w, 16), 1} = one warp's 32 channels (w = 32 / r source channels
  // per warp; step_kernel_v3.cuh). The v3 kernel takes the params as a __grid_constant__ so that the map's address
  // (in the kernel parameter space) can be handed to the TMA.
  bool v3_tma;
  // v3 with the tensor map: the warp's conv-cache rows of a slot (w channels x S contiguous 16-bit entries) come
  // with the state, one bulk copy on the same mbarrier (APRIEL_STEP_V3_CONV_STAGE; set by the host only for a
  // compact conv cache of the activation dtype with channel stride S, unit position stride, 16-byte aligned
  // slot stride / base / w * S * 2, S <= 4, and the 4-deep ring).
  bool v3_conv_stage;
  // v3: the updated state is stored from registers to the global cache (APRIEL_STEP_V3_DIRECT_STORE=1) instead of
  // through the shared-memory stage and a TMA / bulk store (the default).
  bool v3_direct_store;
  alignas(64) unsigned char v3_state_map[128];
};

// Launchers, one per activation dtype (step_{fp16,bf16,fp32}.cu); they dispatch state dtype and
// sequences-per-block. ssm_state_bf16 selects the bf16 SSM cache (fp32 math, rounded on store).
void launch_mixer_step_fp16(const MixerStepParams& p, bool ssm_state_bf16, void* stream);
void launch_mixer_step_bf16(const MixerStepParams& p, bool ssm_state_bf16, void* stream);
void launch_mixer_step_fp32(const MixerStepParams& p, bool ssm_state_bf16, void* stream);

// Version 2 (the default; step_kernel_v2.cuh, step_v2_{fp16,bf16,fp32}.cu): no shared memory, no block
// barrier, all loads of a thread issued together. APRIEL_STEP_KERNEL=v1 selects the launchers above.
void launch_mixer_step_v2_fp16(const MixerStepParams& p, bool ssm_state_bf16, void* stream);
void launch_mixer_step_v2_bf16(const MixerStepParams& p, bool ssm_state_bf16, void* stream);
void launch_mixer_step_v2_fp32(const MixerStepParams& p, bool ssm_state_bf16, void* stream);

// Version 3 (opt-in, APRIEL_STEP_KERNEL=v3; step_kernel_v3.cuh, step_v3_{fp16,bf16}.cu): q = 1, 16-bit
// activations, sm_90: the state staged through shared memory by the TMA, parameters once per warp.
void launch_mixer_step_v3_fp16(const MixerStepParams& p, bool ssm_state_bf16, void* stream);
void launch_mixer_step_v3_bf16(const MixerStepParams& p, bool ssm_state_bf16, void* stream);

// The kernel's thread mapping is built for 16-state channels (4 lanes x 4 states).
constexpr int kDState = 16;

}  // namespace step
}  // namespace apriel
