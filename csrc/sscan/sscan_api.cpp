// Host side of the generic selective scan family: argument checks, parameter packing, launches, and the
// torch epilogues of the backward (sums of per-block / per-batch partials in a fixed order: deterministic).
// Registers torch.ops.apriel_C.selective_scan_fwd / selective_scan_bwd (CUDA) with exactly the positional
// arguments of apriel_kernels/selective_scan.py. The Python op validates everything first (a C++ exception
// from an extension op kills the process on the GPU machine, docs/notes/STATUS.md item 4): these checks
// only guard raw torch.ops callers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>
#include <string>

#include "../common/sm_count.h"
#include "../common/split_rule.h"
#include "sscan_params.h"

namespace apriel {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

Tensor f32c(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

int groups_per_block(int64_t cpg) { return cpg >= kSsChannels ? 1 : static_cast<int>(kSsChannels / cpg); }

// v2 staging flags (sscan_params.h): per activation, keep the tile token-fast (token stride 1, mamba's
// channel-major layout) or token-major, and whether 16-byte cp.async copies are legal: unit stride along the
// copied rows, 16-byte aligned base, every other stride and the blocks' start offsets multiples of 16 bytes.
// B and C share one orientation (the scan loop is compiled per orientation): if they disagree both are staged
// token-major, the token-fast one by plain loads.
void set_v2_staging(SScanParams& p, const Tensor& u, const Tensor& delta, const OptT& z, const Tensor& B,
                    const Tensor& C) {
  const int64_t vec = 16 / static_cast<int64_t>(delta.element_size());
  auto tfast = [](int64_t ls, int64_t cs) { return ls == 1 && cs != 1; };
  // other: the strides / offsets that must be multiples of vec (batch stride only when batch > 1).
  auto can_vec = [&](const Tensor& t, bool tf, int64_t ls, int64_t cs, std::initializer_list<int64_t> other) {
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
    if (tf ? ls != 1 : cs != 1) return false;
    if ((tf ? cs : ls) % vec != 0) return false;
    if (p.batch > 1 && t.stride(0) % vec != 0) return false;
    for (int64_t o : other)
      if (o % vec != 0) return false;
    return true;
  };
  p.v2_tfast = 0; p.v2_vec = 0;
  auto set = [&](int bit, bool tf, bool v) {
    if (tf) p.v2_tfast |= 1u << bit;
    if (v) p.v2_vec |= 1u << bit;
  };
  // u: the block's first u column is a multiple of 16 (16 consecutive channels map to 16 consecutive columns).
  bool tf = tfast(p.u_sl, p.u_sc);
  set(kV2U, tf, can_vec(u, tf, p.u_sl, p.u_sc, {}));
  tf = tfast(p.dl_sl, p.dl_sc);
  set(kV2Delta, tf, can_vec(delta, tf, p.dl_sl, p.dl_sc, {}));
  if (z) {
    tf = tfast(p.z_sl, p.z_sc);
    set(kV2Z, tf, can_vec(*z, tf, p.z_sl, p.z_sc, {}));
  }
  const bool bc_tf = tfast(p.B_sl, p.B_sn) && tfast(p.C_sl, p.C_sn);
  set(kV2B, bc_tf, bc_tf == tfast(p.B_sl, p.B_sn) && can_vec(B, bc_tf, p.B_sl, p.B_sn, {p.b_groups > 1 ? p.B_sg : 0}));
  set(kV2C, bc_tf, bc_tf == tfast(p.C_sl, p.C_sn) && can_vec(C, bc_tf, p.C_sl, p.C_sn, {p.c_groups > 1 ? p.C_sg : 0}));
}

// The v7 kernels' shapes (sscan_fwd7.cuh, sscan_bwd7.cuh): 16-bit activations on v2's shapes whose 64-channel blocks
// each lie in one B group and one C group, without documents; and their default's grid rule: batch x d_inner / 64
// blocks reach 0.9 blocks per SM (b >= 2 at d_inner 4096 on an H100, for the forward and the backward alike).
bool v7_shapes(const SScanParams& p, at::ScalarType st, bool has_seq_idx) {
  return st != at::kFloat && p.dim % 64 == 0 && p.b_cpg % 64 == 0 && p.c_cpg % 64 == 0 && !has_seq_idx;
}
bool v7_grid_fills(const SScanParams& p, int device, int64_t segments = 1) {
  return (int64_t)(p.dim / 64) * p.batch * segments * 10 >= 9 * (int64_t)sm_count(device);
}

// The most segments per sequence a v7 split may have: one per tile, and batch x segments <= 65535 (grid.y).
int64_t max_segments(const SScanParams& p) {
  return std::min<int64_t>(p.n_chunks, std::max<int64_t>(1, 65535 / std::max<int64_t>(p.batch, 1)));
}

// The segment count the environment variable `name` forces (capped at max_segments), or 0 where it is unset.
int64_t env_segments(const SScanParams& p, const char* name) {
  std::string bad;
  const int64_t forced = forced_segments(name, max_segments(p), &bad);
  TORCH_CHECK(bad.empty(), name, ": expected a positive integer, got '", bad, "'");
  return forced;
}

// Segments per sequence of the forward v7's sequence split (session 27). Not the backward's wave rule: the forward v7
// runs up to 4 blocks per SM, and its per-block speed falls as they share the SM (H100, L 4096, unsplit, ns per token
// per block: 64 blocks 133 at b1 (L 8192), 128 blocks 132 at b2, 256 blocks 160 at b4, 512 blocks 261 at b8), so a
// split pays only while the grid is under ~1.5 blocks per SM; then the most segments (1, 2, 4 or 8, at most
// max_segments) whose grid stays within 4 blocks per SM: b1 at d_inner 4096 -> 8 (512 blocks), b2 -> 4, b3 -> 2, b4
// and up -> 1. APRIEL_SSCAN_FWD_SEGMENTS=n forces n.
int fwd7_segments(const SScanParams& p, int device) {
  if (const int64_t forced = env_segments(p, "APRIEL_SSCAN_FWD_SEGMENTS")) return static_cast<int>(forced);
  const int64_t blocks = p.batch * (p.dim / 64), sms = sm_count(device);
  if (2 * blocks >= 3 * sms) return 1;
  int64_t segments = 1;
  while (segments < 8 && 2 * segments <= max_segments(p) && blocks * 2 * segments <= 4 * sms) segments *= 2;
  return static_cast<int>(segments);
}

// Segments per sequence of the backward v7's sequence split (session 27; the mixer's wave rule, split_rule.h): b1 at
// d_inner 4096 -> 4 segments (256 blocks), b2 -> 2, b3 -> 4 (H100: 132 SMs), b4 and up -> 1; at most 8 and
// max_segments. APRIEL_SSCAN_BWD_SEGMENTS=n forces n.
int bwd7_segments(const SScanParams& p, int device) {
  if (const int64_t forced = env_segments(p, "APRIEL_SSCAN_BWD_SEGMENTS")) return static_cast<int>(forced);
  // (the mixer's pre-pass constant; the selective scan's carry pre-pass does the same work per element)
  constexpr double kPrePass = 0.17;
  const double blocks = static_cast<double>(p.batch) * (p.dim / 64), slots = 2.0 * sm_count(device);
  return best_segments(blocks, slots, std::min<int64_t>(8, max_segments(p)), kPrePass);
}

SScanParams make_params(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                        const OptT& Dskip, const OptT& z, const OptT& delta_bias, bool softplus,
                        const OptT& init, const OptT& seq_idx, std::vector<Tensor>& keep) {
  TORCH_CHECK(delta.is_cuda() && delta.dim() == 3, "delta: expected a CUDA tensor (batch, seqlen, d_inner)");
  const auto st = delta.scalar_type();
  TORCH_CHECK(st == at::kBFloat16 || st == at::kHalf || st == at::kFloat,
              "delta: the CUDA selective scan supports bf16, fp16 and fp32 (float64 runs on the reference)");
  const int64_t b = delta.size(0), L = delta.size(1), D = delta.size(2);
  TORCH_CHECK(b <= 65535, "delta: the CUDA selective scan supports batch <= 65535");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == D, "A: expected (d_inner, d_state)");
  const int64_t N = A.size(1);
  TORCH_CHECK(N >= 1 && N <= 64, "d_state: the CUDA selective scan supports 1..64, got ", N);
  TORCH_CHECK(u.dim() == 3 && u.size(0) == b && u.size(1) == L && u.scalar_type() == st, "u: expected (batch, seqlen, Du) in delta's dtype");
  const int64_t Du = u.size(2);
  TORCH_CHECK(Du > 0 && D % Du == 0 && (Du == D || Du % N == 0), "u: expected Du = d_inner or a multiple of d_state dividing it");
  for (const auto* t : {&B, &C}) {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == b && t->size(1) == L && t->size(3) == N && t->scalar_type() == st &&
                    t->size(2) > 0 && D % t->size(2) == 0,
                "B, C: expected (batch, seqlen, groups dividing d_inner, d_state) in delta's dtype");
    const int64_t cpg = D / t->size(2);
    TORCH_CHECK(cpg % kSsChannels == 0 || kSsChannels % cpg == 0,
                "B, C: the CUDA selective scan needs d_inner / groups to be a multiple or a divisor of 16");
  }
  if (z) TORCH_CHECK(z->sizes() == delta.sizes() && z->scalar_type() == st, "z: expected delta's shape and dtype");
  if (seq_idx) TORCH_CHECK(seq_idx->scalar_type() == at::kInt && seq_idx->dim() == 2 && seq_idx->size(0) == b && seq_idx->size(1) == L,
                           "seq_idx: expected (batch, seqlen) int32");
  if (init) TORCH_CHECK(init->numel() == b * D * N, "initial_state: expected (batch, d_inner, d_state)");
  if (Dskip) TORCH_CHECK(Dskip->numel() == D, "D: expected (d_inner,)");
  if (delta_bias) TORCH_CHECK(delta_bias->numel() == D, "delta_bias: expected (d_inner,)");

  SScanParams p{};
  p.batch = b; p.seqlen = L; p.dim = D; p.dim_u = Du; p.dstate = N;
  p.n_pass = static_cast<int>((N + kSsLanes - 1) / kSsLanes);
  p.u_rep = static_cast<int>(D / Du);
  p.b_groups = B.size(2); p.c_groups = C.size(2);
  p.b_cpg = D / p.b_groups; p.c_cpg = D / p.c_groups;
  p.b_ngl = groups_per_block(p.b_cpg); p.c_ngl = groups_per_block(p.c_cpg);
  p.n_chunks = static_cast<int>((L + kSsTile - 1) / kSsTile);
  p.softplus = softplus;
  // Forward variant (read per call, for A/B measurements): default v2 where it applies with K from the block
  // count (few blocks, e.g. batch 1: K = 8 for the extra warps; many: K = 4, fewer instructions per element);
  // APRIEL_SSCAN_FWD=v2k4|v2k8 forces K, v1 selects the v1 kernel, plain the v1 kernel without its interleaved
  // tile loop.
  const char* fwd_env = std::getenv("APRIEL_SSCAN_FWD");
  const std::string fwd_variant = fwd_env != nullptr ? fwd_env : "";
  p.interleave = fwd_variant != "plain";
  const bool v2_ok = N == 16 && D % kSsChannels == 0 && p.b_ngl == 1 && p.c_ngl == 1;
  const int64_t blocks = (D / kSsChannels) * b;
  p.fwd_k = 0;
  if (v2_ok && fwd_variant != "plain" && fwd_variant != "v1")
    p.fwd_k = fwd_variant == "v2k4" ? 4 : fwd_variant == "v2k8" ? 8 : (blocks <= 1024 ? 8 : 4);
  // Backward: v2 by default on the forward v2's shapes (H100, session 2: fwd+bwd b1 L8192 3.07 ms vs 7.22 with
  // v1, b8 L4096 10.9 vs 27.8; all GPU tests pass); APRIEL_SSCAN_BWD=v1 selects v1 (it takes the forward v2's
  // checkpoints: equal to v1's up to v2's fast softplus, ~1e-6 relative), plain = v1's plain loops.
  const char* bwd_env = std::getenv("APRIEL_SSCAN_BWD");
  const std::string bwd_variant = bwd_env != nullptr ? bwd_env : "";
  p.interleave_bwd = bwd_variant != "plain";
  p.bwd_v2 = v2_ok && (bwd_variant.empty() || bwd_variant == "v2" || bwd_variant == "v7");
  const char* sp_env = std::getenv("APRIEL_SSCAN_SOFTPLUS");
  p.fast_prep = sp_env == nullptr || std::string(sp_env) != "precise";
  p.u = u.data_ptr(); p.u_sb = u.stride(0); p.u_sl = u.stride(1); p.u_sc = u.stride(2);
  p.dl = delta.data_ptr(); p.dl_sb = delta.stride(0); p.dl_sl = delta.stride(1); p.dl_sc = delta.stride(2);
  if (z) { p.z = z->data_ptr(); p.z_sb = z->stride(0); p.z_sl = z->stride(1); p.z_sc = z->stride(2); }
  p.B = B.data_ptr(); p.B_sb = B.stride(0); p.B_sl = B.stride(1); p.B_sg = B.stride(2); p.B_sn = B.stride(3);
  p.C = C.data_ptr(); p.C_sb = C.stride(0); p.C_sl = C.stride(1); p.C_sg = C.stride(2); p.C_sn = C.stride(3);
  if (p.fwd_k != 0 || p.bwd_v2) set_v2_staging(p, u, delta, z, B, C);
  // Forward v7 (sscan_fwd7.cuh, session 25) on the v7 shapes. Default where its fast staging applies
  // (sscan_fwd7_fast_layout: mamba's channel-major layout, or token-major, aligned) and its grid fills the GPU
  // (v7_grid_fills). H100, bf16, D 4096, L 4096, graph p50 ms (bench/results/s25/sscan_batches_14ff3b0/,
  // channel-major): v2 (its K rule) -> v7 b2 0.711 -> 0.544, b3 0.793 -> 0.657, b4 1.164 -> 0.658, b8 2.28 / 1.88
  // (K = 8 / 4) -> 1.11; b1's 64 blocks keep v2 (0.371 vs 0.536). Mixed orientations run v7's generic staging, slower
  // than v2: v2.
  // APRIEL_SSCAN_FWD=v7 forces it wherever it applies (else v2).
  // Session 27: with the sequence split where the grid is small (fwd7_segments; fast stagings only), from batch 1:
  // graph p50 ms (bench/results/s27/fwd_split_0657287/), v2 K = 8 -> v7 split: b1 L2048 0.181 -> 0.134, L4096 0.360 ->
  // 0.250, L8192 0.734 -> 0.505 (8 segments); b2 L4096 0.546 (v7 unsplit) -> 0.467 (4), b3 0.657 -> 0.626 (2).
  const bool fast7 = sscan_fwd7_fast_layout(p) != 0;
  const int fwd_segments = fast7 ? fwd7_segments(p, delta.get_device()) : 1;
  p.fwd_v7 = p.fwd_k != 0 && v7_shapes(p, st, seq_idx.has_value()) &&
             (fwd_variant == "v7" ||
              (fwd_variant.empty() && fast7 && v7_grid_fills(p, delta.get_device(), fwd_segments)));
  split_tiles(p.n_chunks, p.fwd_v7 ? fwd_segments : 1, p.fwd_segments, p.fwd_seg_tiles);
  auto hold = [&](Tensor t) -> const float* { keep.push_back(t); return t.data_ptr<float>(); };
  p.A = hold(f32c(A));
  p.Dskip = Dskip ? hold(f32c(*Dskip)) : nullptr;
  p.delta_bias = delta_bias ? hold(f32c(*delta_bias)) : nullptr;
  p.init = init ? hold(f32c(*init)) : nullptr;
  if (seq_idx) { keep.push_back(seq_idx->contiguous()); p.seq_idx = keep.back().data_ptr<int>(); }
  return p;
}

template <bool kFwd>
void launch(const SScanParams& p, at::ScalarType st) {
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  if (st == at::kBFloat16) kFwd ? launch_sscan_fwd<__nv_bfloat16>(p, stream) : launch_sscan_bwd<__nv_bfloat16>(p, stream);
  else if (st == at::kHalf) kFwd ? launch_sscan_fwd<__half>(p, stream) : launch_sscan_bwd<__half>(p, stream);
  else kFwd ? launch_sscan_fwd<float>(p, stream) : launch_sscan_bwd<float>(p, stream);
}

// The forward's launch (the op's, or the backward's rerun for checkpoints): with the sequence split, first the state
// pre-pass's (E, P) buffer per segment, held until the call returns (only where the forward runs: a backward given
// the checkpoints needs none).
void launch_forward(SScanParams& p, const Tensor& delta, std::vector<Tensor>& keep) {
  if (p.fwd_segments > 1) {
    keep.push_back(at::empty({p.batch, p.fwd_segments, 2, p.dim, p.dstate}, delta.options().dtype(at::kFloat)));
    p.seg_state = keep.back().data_ptr<float>();
  }
  launch<true>(p, delta.scalar_type());
}

// save_checkpoints: also return the fp32 states before every 32-token tile (b, ceil(L/32), D, N), which the
// backward then takes instead of rerunning the forward (else an empty (0,) tensor).
std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd_cuda(const Tensor& u, const Tensor& delta, const Tensor& A,
                                                           const Tensor& B, const Tensor& C, const OptT& Dskip,
                                                           const OptT& z, const OptT& delta_bias, bool softplus,
                                                           const OptT& init, const OptT& seq_idx,
                                                           bool save_checkpoints) {
  c10::cuda::CUDAGuard guard(delta.device());
  std::vector<Tensor> keep;
  SScanParams p = make_params(u, delta, A, B, C, Dskip, z, delta_bias, softplus, init, seq_idx, keep);
  auto f32 = delta.options().dtype(at::kFloat);
  Tensor y = at::empty({p.batch, p.seqlen, p.dim}, delta.options());
  Tensor final_state = at::empty({p.batch, p.dim, p.dstate}, f32);
  Tensor ckpt = save_checkpoints ? at::empty({p.batch, p.n_chunks, p.dim, p.dstate}, f32) : at::empty({0}, f32);
  if (p.batch == 0) return {y, final_state, ckpt};
  if (p.seqlen == 0) {
    if (init) final_state.copy_(*init); else final_state.zero_();
    return {y, final_state, ckpt};
  }
  p.y = y.data_ptr(); p.final_state = final_state.data_ptr<float>();
  p.ckpt = save_checkpoints ? ckpt.data_ptr<float>() : nullptr;
  launch_forward(p, delta, keep);
  return {y, final_state, ckpt};
}

// (b, L, nblk, ngl, N) per-block partials -> (b, L, G, N) group sums (fixed order).
Tensor sum_group_partials(const Tensor& part, int64_t groups, int64_t cpg) {
  const int64_t b = part.size(0), L = part.size(1), nblk = part.size(2), ngl = part.size(3), N = part.size(4);
  if (cpg >= kSsChannels) return part.view({b, L, groups, nblk / groups, N}).sum(3);
  return part.view({b, L, nblk * ngl, N}).narrow(2, 0, groups).contiguous();
}

std::vector<Tensor> selective_scan_bwd_cuda(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                            const Tensor& C, const OptT& Dskip, const OptT& z,
                                            const OptT& delta_bias, bool softplus, const OptT& init,
                                            const OptT& seq_idx, const Tensor& dy, const OptT& dfinal,
                                            const OptT& checkpoints) {
  c10::cuda::CUDAGuard guard(delta.device());
  std::vector<Tensor> keep;
  SScanParams p = make_params(u, delta, A, B, C, Dskip, z, delta_bias, softplus, init, seq_idx, keep);
  const auto st = delta.scalar_type();
  const int64_t b = p.batch, L = p.seqlen, D = p.dim, N = p.dstate;
  TORCH_CHECK(dy.dim() == 3 && dy.size(0) == b && dy.size(1) == L && dy.size(2) == D,
              "dy: expected (batch, seqlen, d_inner)");
  auto f32 = delta.options().dtype(at::kFloat);
  // Backward v7 (sscan_bwd7.cuh, session 26): on the v7 shapes with the forward v7's fast staging and 16-byte dy rows;
  // APRIEL_SSCAN_BWD=v7 forces it wherever it applies, v2 forces v2. Default where its grid - with the sequence split
  // (session 27: bwd7_segments) - fills the GPU (v7_grid_fills). H100, bf16, D 4096, L 4096, channel-major, bwd p50
  // ms (bench/results/s26/bwd_batches_d82da6a/): v2 -> v7 b2 2.30 -> 2.10, b3 3.34 -> 2.53, b4 4.41 -> 2.58, b8 8.77
  // -> 5.08; b1 1.19 (v2) vs 2.04 (v7, unsplit: 64 blocks). With the split (bench/results/s27/split_1e12b09/, eager):
  // b1 L4096 1.15 (v2) -> 0.79 (4 segments), L8192 2.25 -> 1.48; b2 2.02 (unsplit) -> 1.44 (2), b3 2.51 -> 2.20 (4).
  const char* bwd_env = std::getenv("APRIEL_SSCAN_BWD");
  const std::string bwd_variant = bwd_env != nullptr ? bwd_env : "";
  const int fast = sscan_fwd7_fast_layout(p);
  const int segments = bwd7_segments(p, delta.get_device());
  p.bwd_v7 = p.bwd_v2 && v7_shapes(p, st, seq_idx.has_value()) && fast != 0 &&
             (bwd_variant == "v7" || (bwd_variant.empty() && v7_grid_fills(p, delta.get_device(), segments)));
  // dy: v2 reads (b, L, D) contiguous; v7 in the activations' orientation with 16-byte rows - mamba's layout hands dy
  // over token-fast, and its transpose copy took 1.0 of the 6.2 ms of the b8 L4096 backward (session 26).
  Tensor dy_c = dy.to(st);
  if (p.bwd_v7) {
    auto rows16 = [](const Tensor& t, int64_t row_stride) {
      return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && row_stride % 8 == 0 && t.stride(0) % 8 == 0;
    };
    if (fast == 1) {
      if (!(dy_c.stride(1) == 1 && rows16(dy_c, dy_c.stride(2))))  // (a copy even where the transpose is contiguous)
        dy_c = dy_c.transpose(1, 2).clone(at::MemoryFormat::Contiguous).transpose(1, 2);
      p.bwd_v7 = rows16(dy_c, dy_c.stride(2));  // (padded activations with L % 8 != 0: v2)
    } else if (!(dy_c.stride(2) == 1 && rows16(dy_c, dy_c.stride(1)))) {
      dy_c = dy_c.clone(at::MemoryFormat::Contiguous);
    }
  }
  if (!p.bwd_v7) dy_c = dy_c.contiguous();
  // (after the dy decision: the partial rows below follow the segment count, and v2 writes one per sequence)
  split_tiles(p.n_chunks, p.bwd_v7 ? segments : 1, p.bwd_segments, p.seg_tiles);
  const int64_t nblk = p.bwd_v7 ? D / 64 : (D + kSsChannels - 1) / kSsChannels;
  const bool grouped_u = p.u_rep > 1;
  Tensor du = at::empty({b, L, D}, grouped_u ? f32 : delta.options());
  Tensor ddelta = at::empty({b, L, D}, delta.options());
  Tensor dz = z ? at::empty({b, L, D}, delta.options()) : Tensor();
  Tensor dB_part = at::empty({b, L, nblk, p.b_ngl, N}, f32);
  Tensor dC_part = at::empty({b, L, nblk, p.c_ngl, N}, f32);
  // (v7: one row per (b, segment); the pre-pass's (L, P) per later segment)
  const int64_t bs = b * p.bwd_segments;
  Tensor dA_part = at::empty({bs, D, N}, f32);
  Tensor dD_part = at::empty({bs, D}, f32), ddb_part = at::empty({bs, D}, f32);
  Tensor seg_carry = p.bwd_segments > 1 ? at::empty({b, p.bwd_segments, 2, D, N}, f32) : Tensor();
  Tensor dinit = at::empty({b, D, N}, f32);
  Tensor dfs = dfinal && dfinal->numel() ? f32c(*dfinal) : Tensor();
  if (b > 0 && L > 0) {
    // State checkpoints (fp32, before every 32-token tile): the forward's (save_checkpoints) when given, else
    // the forward runs again here (no y / final state written): (b, L/32, D, N) fp32 = 2 bytes per (token,
    // channel) at N 16.
    Tensor ckpt;
    if (checkpoints && checkpoints->numel() == b * p.n_chunks * D * N && checkpoints->scalar_type() == at::kFloat &&
        checkpoints->is_contiguous() && checkpoints->device() == delta.device()) {
      ckpt = *checkpoints;
    } else {
      ckpt = at::empty({b, p.n_chunks, D, N}, f32);
      SScanParams q = p;
      q.y = nullptr; q.final_state = nullptr; q.ckpt = ckpt.data_ptr<float>();
      launch_forward(q, delta, keep);
    }
    p.dy = dy_c.data_ptr();
    p.dy_sb = dy_c.stride(0); p.dy_sl = dy_c.stride(1); p.dy_sc = dy_c.stride(2);
    if (reinterpret_cast<uintptr_t>(p.dy) % 16 == 0) p.v2_vec |= 1u << kV2Dy;  // rows: D % 16 == 0 elements
    p.dfinal = dfs.defined() ? dfs.data_ptr<float>() : nullptr;
    p.ckpt_in = ckpt.data_ptr<float>();
    p.du = du.data_ptr(); p.du_f32 = grouped_u;
    p.ddelta = ddelta.data_ptr(); p.dz = z ? dz.data_ptr() : nullptr;
    p.dB_part = dB_part.data_ptr<float>(); p.dC_part = dC_part.data_ptr<float>();
    p.dA_part = dA_part.data_ptr<float>(); p.dD_part = dD_part.data_ptr<float>(); p.ddb_part = ddb_part.data_ptr<float>();
    p.dinit = dinit.data_ptr<float>();
    p.seg_carry = seg_carry.defined() ? seg_carry.data_ptr<float>() : nullptr;
    launch<false>(p, st);
  } else {
    for (Tensor* t : {&du, &ddelta, &dB_part, &dC_part, &dA_part, &dD_part, &ddb_part}) t->zero_();
    if (z) dz.zero_();
    dinit.copy_(dfs.defined() ? dfs.view_as(dinit) : at::zeros_like(dinit));
  }
  Tensor du_out = du;
  if (grouped_u) du_out = du.view({b, L, p.dim_u / N, p.u_rep, N}).sum(3).view({b, L, p.dim_u}).to(st);
  auto empty = [&] { return u.new_empty({0}); };  // a fresh one per absent input: outputs must not alias
  return {du_out,
          ddelta,
          dA_part.sum(0).to(A.scalar_type()),
          sum_group_partials(dB_part, p.b_groups, p.b_cpg).to(B.scalar_type()),
          sum_group_partials(dC_part, p.c_groups, p.c_cpg).to(C.scalar_type()),
          Dskip ? dD_part.sum(0).to(Dskip->scalar_type()) : empty(),
          z ? dz : empty(),
          delta_bias ? ddb_part.sum(0).to(delta_bias->scalar_type()) : empty(),
          init ? dinit.view(init->sizes()).to(init->scalar_type()) : empty()};
}

}  // namespace
}  // namespace apriel

TORCH_LIBRARY_FRAGMENT(apriel_C, m) {
  // Generic selective scan forward: y (b, L, D) in delta's dtype, final state (b, D, N) fp32, checkpoints.
  m.def("selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool delta_softplus, Tensor? initial_state, Tensor? seq_idx, bool save_checkpoints) "
        "-> (Tensor, Tensor, Tensor)");
  // Its backward: [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state] (empty for absent inputs).
  // checkpoints: the forward's saved states (None / empty: rerun the forward for them).
  m.def("selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, bool delta_softplus, Tensor? initial_state, Tensor? seq_idx, Tensor dy, "
        "Tensor? dfinal_state, Tensor? checkpoints) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(apriel_C, CUDA, m) {
  m.impl("selective_scan_fwd", &apriel::selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd", &apriel::selective_scan_bwd_cuda);
}
