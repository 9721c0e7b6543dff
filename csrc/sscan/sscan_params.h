// Raw pointers + element strides for the generic (mamba-compatible) selective scan kernels.
// Filled by sscan_api.cpp (torch side); read by the .cu kernels (CUDA headers only).
//
// Shapes (b batch, L tokens, D channels, Du = D / r u-channels, N states, G* groups):
//   u (b, L, Du), delta / z (b, L, D), B (b, L, GB, N), C (b, L, GC, N): any strides (in elements),
//   A (D, N), Dskip / delta_bias (D,), init (b, D, N): fp32 contiguous; seq_idx (b, L) int32 contiguous.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define APRIEL_SS_HD __host__ __device__
#else
#define APRIEL_SS_HD
#endif

namespace apriel {

constexpr int kSsChannels = 16;  // channels per block (blockDim.y)
constexpr int kSsLanes = 16;     // lanes per channel (blockDim.x): lane l owns states l, l+16, ...
constexpr int kSsTile = 32;      // tokens per tile (and per state checkpoint)

struct SScanParams {
  int batch, seqlen, dim, dim_u, dstate;
  int n_pass;          // ceil(N / 16): states per lane, processed one pass at a time
  int u_rep;           // r = D / Du (1: u has D channels)
  int b_cpg, c_cpg;    // channels per B / C group (D / GB, D / GC)
  int b_groups, c_groups;
  int b_ngl, c_ngl;    // B / C groups a block of 16 channels touches (1, or 16 / cpg)
  int n_chunks;        // ceil(L / kSsTile)
  bool softplus;
  bool interleave_bwd; // backward: the same (APRIEL_SSCAN_BWD=plain: off)
  bool interleave;     // forward: float2 (delta, delta u) / (B, C) tiles where possible (APRIEL_SSCAN_FWD=plain: off)
  // Forward v2 (sscan_fwd2.cuh): 0 = the v1 kernel above, else K = 4 or 8 lanes per channel. The host sets it
  // only where v2 applies (d_state 16, d_inner % 16 == 0, one B and one C group per block of 16 channels).
  int fwd_k;
  // Forward v7 (sscan_fwd7.cuh, session 25: the mixer scan's v7 scan core, one warp per 16 channels, 16-bit
  // activations): set by the host where it applies (fwd_k != 0, 64 | d_inner and the channels per B / C group, no
  // seq_idx) and its grid reaches 0.9 blocks per SM (or APRIEL_SSCAN_FWD=v7). Its staging fields are v2's.
  bool fwd_v7;
  // v2 staging, one bit per activation (kV2U, kV2Delta, kV2Z, kV2B, kV2C, and kV2Dy for the backward's dy): tfast =
  // the tile is kept token-fast in smem (the tensor's token stride is 1, mamba's channel-major layout); vec = 16-byte
  // cp.async copies are legal (unit stride along the copied rows, every other offset a multiple of 16 bytes).
  unsigned v2_tfast, v2_vec;
  bool fast_prep;      // v2 kernels: MUFU forms of softplus / sigmoid in the per-(channel, token) prep
                       // (default; APRIEL_SSCAN_SOFTPLUS=precise: v1's log1pf(expf(v)), bitwise-v1 states)
  bool bwd_v2;         // backward v2 (sscan_bwd2.cuh; APRIEL_SSCAN_BWD=v2, same shapes as the forward v2)
  // Backward v7 (sscan_bwd7.cuh, session 26: the mixer scan's v7 backward core, one warp per 16 channels): set by
  // the host on the forward v7's shapes with its fast staging and 16-byte dy rows (with bwd_v2, which it replaces);
  // its dB / dC partials are one row per 64-channel block (nblk = d_inner / 64).
  bool bwd_v7;
  // The forward v7's sequence split (session 27): blockIdx.y = b * fwd_segments + segment over fwd_seg_tiles tiles;
  // fwd_segments >= 1 wherever the forward v7 runs. With segments > 1 the state pre-pass (sscan_fwd7.cuh sscan7p)
  // writes seg_state (b, segments, 2, D, N) fp32: per segment s < segments - 1 its end state from a zero state (E),
  // then exp(A sum delta) over it (P). Only the last segment's blocks write the final state.
  int fwd_segments, fwd_seg_tiles;
  float* seg_state;
  // The backward v7's sequence split (session 27; the mixer's, scan_params.h): blockIdx.y = b * bwd_segments +
  // segment, a segment = seg_tiles tiles (the last may be shorter); bwd_segments >= 1 wherever bwd_v7 is set. With
  // segments > 1 the carry pre-pass (sscan_bwd7.cuh) writes seg_carry (b, segments, 2, D, N) fp32: per segment s >= 1
  // the adjoint carry at its start given a zero carry at its end (L), then exp(A sum delta) over it (P); and dA_part /
  // dD_part / ddb_part have one row per (b, segment).
  int bwd_segments, seg_tiles;
  float* seg_carry;

  const void* u;   int64_t u_sb, u_sl, u_sc;
  const void* dl;  int64_t dl_sb, dl_sl, dl_sc;   // delta
  const void* z;   int64_t z_sb, z_sl, z_sc;      // or nullptr
  const void* B;   int64_t B_sb, B_sl, B_sg, B_sn;
  const void* C;   int64_t C_sb, C_sl, C_sg, C_sn;
  const float* A;           // (D, N)
  const float* Dskip;       // (D,) or nullptr
  const float* delta_bias;  // (D,) or nullptr
  const float* init;        // (b, D, N) or nullptr
  const int* seq_idx;       // (b, L) or nullptr

  // Forward outputs (each may be nullptr: the backward reruns the forward for checkpoints only).
  void* y;            // (b, L, D) contiguous, activation dtype
  float* final_state; // (b, D, N)
  float* ckpt;        // (b, n_chunks, D, N): state before each tile

  // Backward.
  const void* dy;           // (b, L, D) contiguous, activation dtype (v7: any strides, dy_sb / dy_sl / dy_sc)
  int64_t dy_sb, dy_sl, dy_sc;
  const float* dfinal;      // (b, D, N) or nullptr
  const float* ckpt_in;     // (b, n_chunks, D, N)
  void* du;                 // (b, L, D): activation dtype, or fp32 when du_f32 (grouped u: summed on host)
  bool du_f32;
  void* ddelta;             // (b, L, D) activation dtype
  void* dz;                 // (b, L, D) activation dtype, or nullptr
  float* dB_part;           // (b, L, nblk, b_ngl, N): per-block sums over the block's channels of a group
  float* dC_part;           // (b, L, nblk, c_ngl, N)
  float* dA_part;           // (b, D, N); backward v7: (b * bwd_segments, D, N)
  float* dD_part;           // (b, D); backward v7: (b * bwd_segments, D)
  float* ddb_part;          // (b, D); backward v7: (b * bwd_segments, D)
  float* dinit;             // (b, D, N) or nullptr
};

// Dynamic shared memory of each kernel (bytes). apriel_kernels/selective_scan.py mirrors these formulas to
// reject shapes that do not fit before a kernel is called: keep both in sync.
constexpr int kSsRow = 17;  // padded row (17 floats) of a (token x 16 channel) tile
APRIEL_SS_HD inline int sscan_bc_row(int ngl, int n_pass) { return ngl * 16 * n_pass + 1; }
inline int sscan_fwd_smem_bytes(const SScanParams& p) {
  const int floats = 7 * kSsTile * kSsRow + kSsTile * (sscan_bc_row(p.b_ngl, p.n_pass) + sscan_bc_row(p.c_ngl, p.n_pass)) +
                     kSsTile + p.n_pass * kSsChannels * kSsLanes;
  return floats * 4;
}
inline int sscan_bwd_smem_bytes(const SScanParams& p) {
  const int floats = 14 * kSsTile * kSsRow + kSsTile * (sscan_bc_row(p.b_ngl, p.n_pass) + sscan_bc_row(p.c_ngl, p.n_pass)) +
                     kSsTile + 2 * p.n_pass * kSsChannels * kSsLanes + 2 * kSsTile * kSsChannels * kSsLanes;
  return floats * 4;
}

enum { kV2U = 0, kV2Delta = 1, kV2Z = 2, kV2B = 3, kV2C = 4, kV2Dy = 5 };

// The forward v7's fast staging (sscan_fwd7.cuh kFast): every activation in one orientation with 16-byte copies -
// 1: token-fast (mamba's channel-major layout with aligned rows), 2: token-major; 0: neither.
inline int sscan_fwd7_fast_layout(const SScanParams& p) {
  const unsigned all =
      (1u << kV2U) | (1u << kV2Delta) | (1u << kV2B) | (1u << kV2C) | (p.z != nullptr ? 1u << kV2Z : 0u);
  if ((p.v2_vec & all) != all) return 0;
  return (p.v2_tfast & all) == all ? 1 : (p.v2_tfast & all) == 0 ? 2 : 0;
}

template <typename T>
void launch_sscan_fwd(const SScanParams& p, void* stream);
template <typename T>
void launch_sscan_fwd2(const SScanParams& p, void* stream);  // sscan_fwd2_<dtype>.cu
template <typename T>
void launch_sscan_fwd7(const SScanParams& p, void* stream);  // sscan_fwd7_<dtype>.cu (16-bit only)
template <typename T>
void launch_sscan_bwd2(const SScanParams& p, void* stream);  // sscan_bwd2_<dtype>.cu
template <typename T>
void launch_sscan_bwd7(const SScanParams& p, void* stream);  // sscan_bwd7_<dtype>.cu (16-bit only)
template <typename T>
void launch_sscan_bwd(const SScanParams& p, void* stream);

}  // namespace apriel
