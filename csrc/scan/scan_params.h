// Raw pointers + element strides for the fused Apriel-H1 mixer scan kernels (forward and backward).
// Filled by scan_api.cpp (torch side); read by the .cu kernels (CUDA headers only).
#pragma once
#include <cstdint>
#include <vector_types.h>  // int4 (the varlen document list)

namespace apriel {

// The dtype of a small parameter tensor as the kernels see it (ParamRef, the backward's fp32 conversion and its
// gradient stores). The kernels that read ParamRef see fp32 / bf16 / fp16 only: the host converts fp64 first.
enum ParamDType : int { kParamF32 = 0, kParamBF16 = 1, kParamF16 = 2, kParamF64 = 3 };
// A small tensor read in its own dtype (contiguous).
struct ParamRef {
  const void* ptr = nullptr;
  int dtype = kParamF32;
};

struct MixerScanParams {
  int batch, seqlen, d_inner, d_xb, dt_rank, width;
  int heads_per_group;     // r = d_inner / d_xb: heads sharing one x / B group
  int n_chunks;            // ceil(seqlen / kChunk): checkpoint count per sequence
  bool repeat_before_conv; // conv weights per D channel (true) or per X channel (false)

  // Activations (zxbc's dtype). zxbc / dt_low: unit stride in the last dim, strides in elements.
  const void* zxbc;
  int64_t zxbc_batch_stride, zxbc_row_stride;
  const void* dt_low;
  int64_t dt_batch_stride, dt_row_stride;

  // Parameters, fp32 contiguous (converted on the host: they are small).
  const float* conv_w;   // (Cc, width)
  const float* conv_b;   // (Cc,) or nullptr
  const float* dt_w;     // (D, R)
  const float* dt_b;     // (D,)
  const float* A_log;    // (D, 16)
  const float* Dskip;    // (D,)

  // The same parameters in their own dtypes (forward v4 reads these: no conversion kernels per call).
  ParamRef conv_w_raw, conv_b_raw, dt_w_raw, dt_b_raw, A_log_raw, D_raw;
  // 16-byte copies are legal: base pointers 16-byte aligned and every row/batch stride a multiple of 16 bytes
  // (dt_vec16 also needs dt_rank * sizeof(T) % 16 == 0).
  bool zxbc_vec16, dt_vec16;
  bool dy_vec16;  // backward v4: dy (b, L, D) 16-byte aligned with d_inner * sizeof(T) % 16 == 0 (cp.async rows)
  bool bwd_f32_bc;  // backward v4: fp32 copies of B / C (APRIEL_SCAN_BWD_BC=f32) instead of raw-tile reads
  bool raw_bc;  // forward v4, 16-bit activations: scan reads B / C from the raw tile (APRIEL_SCAN_BC=f32: fp32 copies)

  const float* init_ssm;   // (b, D, 16) or nullptr
  const float* init_conv;  // (b, X, width-1) compact layout, or nullptr
  const int* seq_idx;      // (b, L) or nullptr

  // Forward outputs.
  void* y;                 // (b, L, D) contiguous, zxbc's dtype
  float* final_ssm;        // (b, D, 16)
  void* final_conv;        // (b, X, width-1), zxbc's dtype
  float* ckpt;             // (b, n_chunks, D, 16): state before each chunk, or nullptr
  // Sub-chunk checkpoints (session 30; nullptr: none): the states after tokens 7, 15, 23 of every chunk, (b,
  // n_chunks, kSubCkptRows = 3, D, 16), and a flag set to 1 by the kernel that wrote them - the v7 backward then
  // loads them instead of recomputing them (its pass A). The v7 forwards, since session 31 the 16-bit v5 ones and
  // the varlen v7 for whole groups write them; other forward kernels leave both alone (the host zeroes the flag first).
  float* ckpt_sub;
  float* ckpt_sub_flag;

  // Backward inputs / outputs.
  const void* dy;          // (b, L, D) contiguous, zxbc's dtype
  const float* dfinal_ssm; // (b, D, 16) or nullptr
  const float* ckpt_in;    // (b, n_chunks, D, 16)
  const float* ckpt_sub_in;       // the forward's ckpt_sub, or nullptr (the v7 backward's pass A recomputes them)
  const float* ckpt_sub_flag_in;  // its flag: 1 where the forward wrote them
  void* dzxbc;             // (b, L, 2D+2X) contiguous: the kernel writes the z and C slices
  // d(conv input) / dB of the x / B groups in parts, (b, L, bwd_parts, 16) fp32 each, summed by the head-sum kernel:
  // v4 one part per head (bwd_parts = D / 16, head h at part h); v7 without fused sums one per (block, group):
  // the sums of the block's heads of that group, at part blockIdx.x + group (bwd_parts = blocks per row + X / 16
  // - 1; a group's parts are consecutive, in block order).
  float* dx_part;
  float* dB_part;
  int bwd_parts;
  float* ddt_pre;          // (b, L, D): d(dt_proj output)
  float* dA_log_part;      // (b, D, 16)
  float* dD_part;          // (b, D)
  float* dconv_b_part;     // (b, D)
  float* dconv_w_part;     // (b, D, width)
  float* dinit_conv_part;  // (b, D, width-1)
  float* dinit_ssm;        // (b, D, 16)
  // Backward v7 with one block per x / B group (heads_per_group == 4): the kernel sums the 4 heads' d(conv input)
  // and dB itself and writes dzxbc's x / B slices (dx_part / dB_part unused), adding dfinal_conv (b, X, width-1)
  // fp32 at the last width-1 positions.
  bool bwd_fused_sums;
  const float* dfinal_conv;
  // Backward v7: the dt_proj gradients in the kernel (ddt_pre unused): d(dt_low) summed over each block's 64
  // channels (b, L, d_inner / 64, 16), d W_dt (b, D, 16) and sum_t d(dt_pre) (b, D) per sequence (the host sums the
  // blocks / the batch and doubles the bias sum).
  float* ddt_low_part;
  float* ddt_w_part;
  float* ddt_b_part;
  // Backward v7 sequence split (session 7): when batch x d_inner / 64 blocks are too few to fill the GPU (batch 1-3
  // at D 4096), each sequence runs as bwd_segments segments of seg_tiles tiles, one block per (group, segment).
  // The adjoint carry entering each segment from the right comes from a pre-pass (mixer_scan_bwd7_carry_kernel):
  // seg_carry (b, segments, 2, D, 16) holds per segment s >= 1 its local carry L_s (the adjoint at its start given
  // a zero carry at its end) and its decay P_s = prod_t exp(delta_t A); the block of segment s combines them:
  // K_s = L_{s+1} + P_{s+1} K_{s+1}, K_{segments-1} = dfinal_ssm. The whole-sequence partial outputs (dA_log_part,
  // dD_part, dconv_*_part, dinit_conv_part, dinit_ssm, ddt_w_part, ddt_b_part) get one row per (b, segment): index
  // b * segments + s; dinit_conv_part of segment s >= 1 is its contribution to the d(conv input) of the width-1
  // tokens before it, and with fused sums dx_edge (b * segments, width-1, X) fp32 receives a segment's last width-1
  // d(conv input) rows without that contribution (the host adds the two and writes them). 1 / n_chunks otherwise.
  int bwd_segments, seg_tiles;
  float* seg_carry;  // written by the pre-pass, read by the main kernel
  float* dx_edge;

  // Forward with packed documents, varlen scheduling (session 17; mixer_scan_plan.cu, mixer_scan_fwd7.cuh kVar):
  // plan_documents lists the documents on the device and picks, per call, the varlen v7 kernel or the kernel the
  // dispatcher would run otherwise; both are launched and the one not picked returns at once (no host sync, so
  // CUDA graphs and torch.compile keep working).
  const int* fwd_skip;   // v5 forward kernels with documents: return at once when *fwd_skip != 0 (varlen picked)
  const int4* var_items; // per document: (sequence, first token, end token, 0), longest first
  const int* var_count;  // documents in var_items; 0 when the plan did not pick varlen
  int* var_next;         // per channel group (the varlen grid's x): the next item to take (zeroed by the plan)
};

// The varlen plan (mixer_scan_plan.cu). Costs in microseconds per 32-token tile, measured on the H100 (session 17):
// the varlen v7 kernel is estimated as max(lat_tile x the longest document's tiles, thr_tile x all (document, channel
// group) tiles / slots) and picked when that is below margin x other_us (the other kernel's estimate for the call).
struct VarlenPlanCost {
  float lat_tile, thr_tile, slots, other_us, margin;
};
constexpr int kVarlenMaxDocs = 2048;  // more documents per call: the other kernel runs
// Workspace (int32): kVarlenMaxDocs int4 items, then count, skip, then one counter per v7 block column.
constexpr int kVarlenWorkspaceInts = 4 * kVarlenMaxDocs + 2;
// block_columns: the v7 forward's blocks per sequence (mixer_scan_v7_blocks_per_row), one document counter each.
// force: 0 = by cost, 1 = varlen whenever the documents fit.
void launch_plan_documents(const int* seq_idx, int batch, int seqlen, int block_columns, VarlenPlanCost cost, int force,
                           int* workspace, void* stream);

template <typename T, int K>
void launch_mixer_scan_fwd(const MixerScanParams& p, void* stream);
template <typename T, int K>
void launch_mixer_scan_fwd4(const MixerScanParams& p, void* stream);
template <typename T, int K>
void launch_mixer_scan_fwd5(const MixerScanParams& p, void* stream);
// v5 writing the sub-chunk checkpoints too (16-bit, K = 4 / 8; mixer_scan_fwd5s_*.cu): false where it has no kernel.
template <typename T, int K>
bool launch_mixer_scan_fwd5_sub(const MixerScanParams& p, void* stream);
// v7 (mixer_scan_fwd7.cuh, 16-bit activations): tensor-core input product and readout, 4 heads per block.
template <typename T>
void launch_mixer_scan_fwd7(const MixerScanParams& p, void* stream);
// The varlen v7 forward (packed documents, p.var_* from launch_plan_documents): blocks_per_column blocks per block
// column of the v7 forward (mixer_scan_v7_blocks_per_row) take the documents.
template <typename T>
void launch_mixer_scan_fwd7_varlen(const MixerScanParams& p, int blocks_per_column, void* stream);
// The calls v7 handles; the dispatcher runs v5 / v4 for the others (unaligned rows, ...). Packed documents: the
// forward since session 12, the backward since session 13. (The conv width needs no check: the op accepts 2..4 only,
// all of which v7's right-aligned taps handle.)
// The v7 forward kernel itself takes any heads_per_group (session 19: a group's last block may have warps without a
// head, mixer_scan_fwd7.cuh kPartial), and so does the varlen forward (blocks over (block column, document); since
// session 23); the v7 backward takes >= 2 (mixer_scan_bwd7_supports).
inline bool mixer_scan_fwd7_applies(const MixerScanParams& p) {
  return p.zxbc_vec16 && p.dt_vec16 && p.dt_rank <= 16;
}
#if defined(__CUDACC__)
#define APRIEL_SCAN_HD __host__ __device__
#else
#define APRIEL_SCAN_HD
#endif
// Sub-chunk checkpoints (MixerScanParams::ckpt_sub) per tile: layout (b, n_tiles, kSubCkptRows, d_inner, 16), written
// by the v5 / v7 forwards, read by the v7 backward, sized by the host (scan_api.cpp) and the op's fake (Python).
constexpr int kSubCkptRows = 3;
// The v7 forward's blocks per x / B group: ceil(heads_per_group / 4) (blocks of 4 warps, one head each).
APRIEL_SCAN_HD inline int mixer_scan_v7_blocks_per_group(int heads_per_group) { return (heads_per_group + 3) / 4; }
// The v7 forward's blocks per sequence (its grid's x): d_inner / 64 when heads_per_group is a multiple of 4;
// otherwise the group's heads spread evenly over its blocks and the blocks' other warps have no head. (The backward's:
// mixer_scan_bwd7_blocks_per_row.)
inline int mixer_scan_v7_blocks_per_row(const MixerScanParams& p) {
  return (p.d_xb / 16) * mixer_scan_v7_blocks_per_group(p.heads_per_group);
}
// kPartial (session 19): block `block` of the grid's x takes heads sub .. sub + heads - 1 of x / B group `group`. A
// group's heads split evenly over its blocks (5 = 3 + 2, 6 = 3 + 3, 9 = 3 + 3 + 3; block 0's share is the largest):
// an SM's busiest blocks set the time, and 4 + 1 ran as long as 4 + 4 (bench/results/s19/balanced_e273415/).
// Shared by the v7 forward and the host's dispatch estimate. (Session 20: the backward left it for kSpan.)
struct V7GroupShare {
  int group, sub, heads;
};
APRIEL_SCAN_HD inline V7GroupShare mixer_scan_v7_group_share(int heads_per_group, int block) {
  const int per = mixer_scan_v7_blocks_per_group(heads_per_group), group = block / per, k = block - group * per;
  const int base = heads_per_group / per, extra = heads_per_group - base * per;
  return {group, k * base + (k < extra ? k : extra), base + (k < extra ? 1 : 0)};
}
// Backward epilogue (mixer_scan_head_sum.cu): dzxbc's x / B slices = the sums of each group's parts of dx_part /
// dB_part (MixerScanParams::bwd_parts), plus dfinal_conv's rows and a split's segment-halo rows on the x side.
struct HeadSumArgs {
  const float* dx_part;   // (b, L, parts, 16) fp32
  const float* dB_part;   // (b, L, parts, 16) fp32
  void* dzxbc;            // (b, L, 2D + 2X) contiguous, the activation dtype
  int64_t batch, seqlen;
  int D, X, r, parts;
  int heads_per_part;     // group g's parts: [g r / hp + g off, ((g + 1) r - 1) / hp + g off] (hp = 1 or 4)
  bool group_offset;      // off = 1 (v7: part = block + group), else 0 (v4: part = head)
  const float* dfc_rows;  // (b, width-1, X) or nullptr: added to the x rows L-width+1 .. L-1
  int hw;                 // width - 1
  const float* x_halo;    // (b, segments-1, width-1, X) or nullptr: added to each non-last segment's last width-1 x rows
  int segments;
  int64_t seg_len;
};
template <typename T>
void launch_mixer_scan_head_sum(const HeadSumArgs& a, void* stream);
// Backward epilogue (mixer_scan_finalize.cu, session 22): the parameter gradients' fp32 partial rows summed in a fixed
// order and stored in each output's dtype, and a sequence split's halo rows; one launch before the head-sum kernel.
struct FinalizeArgs {
  int64_t batch, seqlen;
  int D, X, r, W, R;
  bool repeat;               // conv per D channel (else per X channel: the conv gradients also sum a group's r heads)
  int bs;                    // partial rows per parameter: batch x segments
  // d(dt_low) (v7; nullptr: none): batch x seqlen rows of nblk partials of 16 -> ddt_low (batch, seqlen, R) in T
  const float* ddt_low_part;
  int nblk;
  void* ddt_low;
  // per channel, each part (bs, D, ...) fp32 -> the output (in *_dtype, a ParamDType)
  const float* dA_part; void* dA; int dA_dtype;       // (bs, D, 16) -> (D, 16)
  const float* dD_part; void* dD; int dD_dtype;       // (bs, D) -> (D)
  const float* dw_part; void* dw; int dw_dtype;       // (bs, D, 16) -> (D, R); nullptr: none (v4: a GEMM)
  const float* db_part; void* db; int db_dtype;       // (bs, D) -> (D), times 2 (the double bias)
  const float* dcw_part; void* dcw; int dcw_dtype;    // (bs, D, W) -> (C, W), C = D if repeat else X
  const float* dcb_part; void* dcb; int dcb_dtype;    // (bs, D) -> (C); dcb nullptr: no conv bias
  // sequence split (segments > 1): the halo of each non-last segment's last hw = W - 1 x rows from the next segment's
  // dic_part rows (bs, D, hw) summed over the group's r heads; with dx_edge (bs, hw, X) (fused group sums) added to
  // it and stored into dzxbc (b, L, 2D + 2X) in T, else into x_halo (b, segments-1, hw, X) fp32
  int segments;
  int64_t seg_len;
  const float* dic_part;
  const float* dx_edge;
  void* dzxbc;
  float* x_halo;
};
template <typename T>
void launch_mixer_scan_finalize(const FinalizeArgs& a, void* stream);
// The parameters the backward kernels read as fp32, converted in one launch (mixer_scan_params.cu, session 22):
// segment i converts n[i] contiguous elements of src[i] (a ParamDType) into dst[i].
struct ParamsF32Args {
  static constexpr int kMax = 6;
  int count;
  const void* src[kMax];
  int dtype[kMax];
  int64_t n[kMax];
  float* dst[kMax];
};
void launch_params_to_f32(const ParamsF32Args& a, void* stream);
template <typename T, int K>
void launch_mixer_scan_bwd(const MixerScanParams& p, void* stream);
template <typename T>
void launch_mixer_scan_bwd4(const MixerScanParams& p, void* stream);
// v7 backward (mixer_scan_bwd7.cuh, 16-bit activations): the adjoint in the forward v7's tensor-core layout. It
// applies where the forward v7 does and dy rows are 16-byte aligned; the dispatcher runs v4 elsewhere.
template <typename T>
void launch_mixer_scan_bwd7(const MixerScanParams& p, void* stream);
inline bool mixer_scan_bwd7_supports(const MixerScanParams& p) {
  // (packed documents: since session 13; heads_per_group % 4 != 0: since session 19, >= 2 since session 20: kSpan -
  // a block's heads span at most two groups; one head per group since session 24 where 4 divides the head count:
  // kMulti - a block's 4 heads are 4 whole groups)
  return mixer_scan_fwd7_applies(p) && p.dy_vec16 &&
         (p.heads_per_group >= 2 || (p.heads_per_group == 1 && (p.d_inner / 16) % 4 == 0));
}
// The v7 backward's blocks per sequence (its grid's x): 4 consecutive heads each, across group boundaries when 4 does
// not divide heads_per_group (kSpan, session 20; the last block may have fewer heads).
inline int mixer_scan_bwd7_blocks_per_row(const MixerScanParams& p) { return (p.d_inner / 16 + 3) / 4; }
// The v7 kernels with heads_per_group % 4 != 0 (forward: kPartial, session 19; backward: kSpan, session 20), called
// by launch_mixer_scan_fwd7 / _bwd7 and instantiated in their own translation units (mixer_scan_fwd7p_*.cu,
// mixer_scan_bwd7s_*.cu) so that no TU's compile time grows.
template <typename T>
void launch_mixer_scan_fwd7_partial(const MixerScanParams& p, void* stream);
template <typename T>
void launch_mixer_scan_fwd7_varlen_partial(const MixerScanParams& p, int blocks_per_column, void* stream);
template <typename T>
void launch_mixer_scan_bwd7_span(const MixerScanParams& p, void* stream);
// One head per group (kMulti, session 24; mixer_scan_bwd7m_*.cu): a block's 4 heads are 4 whole groups.
template <typename T>
void launch_mixer_scan_bwd7_multi(const MixerScanParams& p, void* stream);
// The v7 backward's carry pre-pass (p.bwd_segments > 1): L_s and P_s of segments 1 .. segments-1 into p.seg_carry.
template <typename T>
void launch_mixer_scan_bwd7_carry(const MixerScanParams& p, void* stream);

}  // namespace apriel
