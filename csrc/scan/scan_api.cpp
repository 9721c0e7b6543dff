// Host side of the mixer scan family: argument checks, parameter packing, launches, and the small torch
// epilogues of the backward (sums over the r heads of a group and over the batch in a fixed order, the
// dt_proj GEMMs). Registers torch.ops.apriel_C.mixer_scan_fwd / mixer_scan_bwd (CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "../common/sm_count.h"  // sm_count: the current device's multiprocessors
#include "../common/split_rule.h"  // best_segments, forced_segments: the sequence split's segment count
#include "scan_params.h"

namespace apriel {
namespace {

constexpr int kN = 16, kChunk = 32, kMaxR = 32;
using at::Tensor;
using OptT = std::optional<Tensor>;

Tensor f32c(const Tensor& t) { return t.to(at::kFloat).contiguous(); }
// A parameter's (or its gradient's) dtype as the kernels' code (ParamDType).
int param_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kParamF32;
    case at::kDouble: return kParamF64;
    case at::kBFloat16: return kParamBF16;
    case at::kHalf: return kParamF16;
    default: TORCH_CHECK(false, "mixer scan parameters in ", t.scalar_type(), " are not supported");
  }
  return kParamF32;
}

struct Dims {
  int64_t b, L, D, X, R, W, r, n_chunks;
};

// The flat checkpoint buffer of mode 2 (sub-chunk checkpoints), as the forward sizes it and the backward recognises
// it: the tile checkpoints (b, n_chunks, D, 16), the sub-chunk ones (b, n_chunks, kSubCkptRows, D, 16), then the
// flag at flag_at (apriel_kernels.mixer_scan._checkpoint_buffer sizes the fake the same way).
struct CkptLayout {
  int64_t tile_rows, flag_at;
};
CkptLayout ckpt_layout(const Dims& d) {
  const int64_t tile_rows = d.b * d.n_chunks * d.D * kN;
  return {tile_rows, (1 + kSubCkptRows) * tile_rows};
}

Dims check_inputs(const Tensor& zxbc, const Tensor& dt_low, const Tensor& conv_weight, const OptT& conv_bias,
                  const Tensor& dt_w, const Tensor& dt_b, const Tensor& A_log, const Tensor& Dskip,
                  const OptT& init_ssm, const OptT& init_conv, const OptT& seq_idx, int64_t D, int64_t X,
                  int64_t N, bool repeat) {
  TORCH_CHECK(zxbc.is_cuda(), "zxbc: expected a CUDA tensor");
  TORCH_CHECK(zxbc.dim() == 3 && zxbc.size(2) == 2 * D + 2 * X, "zxbc: expected (batch, seqlen, 2*d_inner + 2*d_xb)");
  auto st = zxbc.scalar_type();
  TORCH_CHECK(st == at::kBFloat16 || st == at::kHalf || st == at::kFloat,
              "zxbc: the CUDA mixer scan supports bf16, fp16 and fp32 (float64 runs on the reference)");
  TORCH_CHECK(N == kN, "d_state: the CUDA mixer scan is written for d_state = 16, got ", N);
  TORCH_CHECK(D % kN == 0 && X % kN == 0 && D % X == 0, "d_inner/d_xb: expected multiples of 16 with d_xb | d_inner");
  TORCH_CHECK(zxbc.stride(2) == 1, "zxbc: expected unit stride in the last dim");
  TORCH_CHECK(dt_low.dim() == 3 && dt_low.size(0) == zxbc.size(0) && dt_low.size(1) == zxbc.size(1) &&
                  dt_low.scalar_type() == st && (dt_low.stride(2) == 1 || dt_low.size(2) == 1),
              "dt_low: expected (batch, seqlen, dt_rank) in zxbc's dtype with unit last stride");
  TORCH_CHECK(dt_low.size(2) <= kMaxR, "dt_low: the CUDA mixer scan supports dt_rank <= ", kMaxR);
  TORCH_CHECK(conv_weight.dim() == 2 && conv_weight.size(1) >= 2 && conv_weight.size(1) <= 4,
              "conv_weight: expected (channels, width) with width in 2..4");
  TORCH_CHECK(conv_weight.size(0) == (repeat ? D : X), "conv_weight: expected ", repeat ? D : X, " channels");
  for (const auto* t : {&dt_w, &dt_b, &A_log, &Dskip, &conv_weight}) TORCH_CHECK(t->is_cuda(), "parameters: expected CUDA tensors");
  TORCH_CHECK(A_log.size(0) == D && A_log.size(1) == N, "A_log: expected (d_inner, d_state)");
  if (init_ssm) TORCH_CHECK(init_ssm->numel() == zxbc.size(0) * D * N, "initial_ssm_state: expected (batch, D/N, N, N)");
  if (init_conv) TORCH_CHECK(init_conv->dim() == 3 && init_conv->size(0) == zxbc.size(0), "initial_conv_state: expected (batch, channels, state_len)");
  if (seq_idx) TORCH_CHECK(seq_idx->scalar_type() == at::kInt && seq_idx->size(0) == zxbc.size(0) && seq_idx->size(1) == zxbc.size(1),
                           "seq_idx: expected (batch, seqlen) int32");
  Dims d{zxbc.size(0), zxbc.size(1), D, X, dt_low.size(2), conv_weight.size(1), D / X, 0};
  d.n_chunks = (d.L + kChunk - 1) / kChunk;
  return d;
}

// (b, Cs, S) conv state (Cs = X, or D with repeat) -> (b, X, W-1) fp32: first copy of each X channel, last W-1.
Tensor compact_init_conv(const Tensor& s, const Dims& d) {
  Tensor t = s;
  if (t.size(1) != d.X) {
    auto src = at::arange(d.X, s.options().dtype(at::kLong));
    t = t.index_select(1, (src.div(kN, "floor") * kN * d.r) + src.remainder(kN));
  }
  return f32c(t.narrow(2, t.size(2) - (d.W - 1), d.W - 1));
}

MixerScanParams fill_params(const Tensor& zxbc, const Tensor& dt_low, const Dims& d, bool repeat,
                            std::vector<Tensor>& keep, const Tensor& conv_weight, const OptT& conv_bias,
                            const Tensor& dt_w, const Tensor& dt_b, const Tensor& A_log, const Tensor& Dskip,
                            const OptT& init_ssm, const OptT& init_conv, const OptT& seq_idx,
                            bool convert_params = true) {
  MixerScanParams p{};
  p.batch = d.b; p.seqlen = d.L; p.d_inner = d.D; p.d_xb = d.X; p.dt_rank = d.R; p.width = d.W;
  p.heads_per_group = d.r; p.n_chunks = d.n_chunks; p.repeat_before_conv = repeat;
  p.zxbc = zxbc.data_ptr(); p.zxbc_batch_stride = zxbc.stride(0); p.zxbc_row_stride = zxbc.stride(1);
  p.dt_low = dt_low.data_ptr(); p.dt_batch_stride = dt_low.stride(0); p.dt_row_stride = dt_low.stride(1);
  auto hold = [&](Tensor t) -> const float* { keep.push_back(t); return t.data_ptr<float>(); };
  // the fp32 copies made below (convert_params), which raw() reuses for fp64 parameters instead of converting again
  struct Fp32Copy { const c10::TensorImpl* param; const float* f32; };
  std::vector<Fp32Copy> as_fp32;
  if (convert_params) {  // fp32 copies for the kernels that read const float* (v3 forward, backward), in one launch
    ParamsF32Args conv{};
    auto to_f32 = [&](const Tensor& t) -> const float* {
      if (t.scalar_type() == at::kFloat && t.is_contiguous()) return hold(t);
      Tensor c = t.contiguous(), out = at::empty(t.sizes(), t.options().dtype(at::kFloat));
      keep.push_back(c);
      conv.src[conv.count] = c.data_ptr(); conv.dtype[conv.count] = param_dtype(c);
      conv.n[conv.count] = c.numel(); conv.dst[conv.count] = out.data_ptr<float>();
      ++conv.count;
      as_fp32.push_back({t.unsafeGetTensorImpl(), out.data_ptr<float>()});
      return hold(out);
    };
    p.conv_w = to_f32(conv_weight);
    p.conv_b = conv_bias ? to_f32(*conv_bias) : nullptr;
    p.dt_w = to_f32(dt_w);
    p.dt_b = to_f32(dt_b);
    p.A_log = to_f32(A_log);
    p.Dskip = to_f32(Dskip);
    launch_params_to_f32(conv, c10::cuda::getCurrentCUDAStream().stream());
  }
  auto raw = [&](const Tensor& t) -> ParamRef {  // own dtype when the kernel can read it, else fp32
    const auto st = t.scalar_type();
    if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf)  // fp64: the fp32 copy made above, if any
      for (const Fp32Copy& f : as_fp32)
        if (f.param == t.unsafeGetTensorImpl()) return ParamRef{f.f32, kParamF32};
    Tensor c = (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf) ? t.contiguous() : f32c(t);
    keep.push_back(c);
    return ParamRef{c.data_ptr(), param_dtype(c)};
  };
  p.conv_w_raw = raw(conv_weight);
  if (conv_bias) p.conv_b_raw = raw(*conv_bias);
  p.dt_w_raw = raw(dt_w);
  p.dt_b_raw = raw(dt_b);
  p.A_log_raw = raw(A_log);
  p.D_raw = raw(Dskip);
  const int64_t vec = 16 / static_cast<int64_t>(zxbc.element_size());
  auto aligned = [&](const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  {
    const char* bc = std::getenv("APRIEL_SCAN_BC");
    p.raw_bc = bc == nullptr || std::string(bc) != "f32";
  }
  p.zxbc_vec16 = aligned(zxbc) && zxbc.stride(0) % vec == 0 && zxbc.stride(1) % vec == 0;
  p.dt_vec16 = aligned(dt_low) && dt_low.stride(0) % vec == 0 && dt_low.stride(1) % vec == 0 && d.R % vec == 0 &&
               dt_low.stride(2) == 1;
  p.init_ssm = init_ssm ? hold(f32c(*init_ssm)) : nullptr;
  p.init_conv = init_conv ? hold(compact_init_conv(*init_conv, d)) : nullptr;
  if (seq_idx) { keep.push_back(seq_idx->contiguous()); p.seq_idx = keep.back().data_ptr<int>(); }
  return p;
}


// Forward version. K = 8 lanes per channel (2 states per thread) has twice the warps per block of K = 4 (latency
// hiding when blocks are few); K = 4 (4 states per thread) spends fewer instructions per element. K = 8 is picked
// when its blocks fill at most two waves at least as well as K = 4's would, with v4's residencies (K = 8 4 blocks
// per SM, K = 4 6); measured on the H100 (scripts/diag/scan_k_threshold.py, bf16, session 2): K = 8 wins at 256 /
// 512 / 1024 blocks (batch 1 / 2 / 4 at D 4096), K = 4 at 768 / 1536 / 2048 (batch 3 / 6 / 8).
// Default (session 4, H100 runs 2-3, bf16 D 4096): the same K choice; K = 4 runs v5 (b8 L4096 1.29 vs v4's 1.46
// ms: 8 blocks per SM instead of 6; ncu: the executed instructions equal v4's), K = 8 runs v4 (b1: v5 K = 8 measured 1-2 % slower -
// latency-bound, see docs/notes/scan.md); fp32 activations keep v4 (v5's fp32 instantiations were not measured and
// spill 20-32 bytes where v4's do not). Returned as K (v4), 100 + K (v5) or 3 (v3).
// Session 5: where K = 4 is chosen, 16-bit activations run v7 (tensor-core input product and readout, one warp per
// head; b8 L4096 1.10 vs v5's 1.30 ms on the H100) when it applies (mixer_scan_fwd7_applies), v5 K = 4 otherwise;
// returned as 107. Batch 1 keeps K = 8: one warp per head is too few warps there (v7 b1 L8192 0.82 vs 0.47 ms).
// Session 6 (scripts/diag/scan_fwd_versions.py, bench/results/s6/fwd_dispatch/, CUDA graphs, D 4096):
// v7 wins once its own grid (batch x d_inner / 64 blocks, 4 per SM) reaches ~2 blocks per SM - b4 L4096 0.614 ms vs
// v4 K = 8 0.769 / v5 K = 4 0.665 - and loses below: b3 0.616 vs v5 K = 4 0.515, b2 L8192 0.827 vs v4 K = 8 0.780.
// So 16-bit activations run v7 when batch x d_inner / 64 >= 1.9 x SMs (batch >= 4 at D 4096), else the K rule with
// v5 for K = 4 and (session 8: v5's recurrence front two tokens ahead, b1 L8192 0.467 vs v4's 0.475 ms) for K = 8;
// since session 25 with v5's own residencies (fwd_v5_lanes).
// APRIEL_SCAN_FWD forces a version for benchmarks and tests: v4 (session-3 default: v4 at either K), v4k4, v4k8,
// v5 (v5 at either K), v5k4, v5k8, v7 (v7 where it applies, else v5 K = 4), v3 (one state per thread, session 1).
int fwd_version_auto(int64_t blocks, int sms, double per_sm8, double per_sm4) {
  const double w8 = static_cast<double>(blocks) / (per_sm8 * sms), w4 = static_cast<double>(blocks) / (per_sm4 * sms);
  auto fill = [](double w) { return w <= 0 ? 1.0 : w / std::ceil(w); };
  return (w8 <= 2.0 && fill(w8) >= fill(w4)) ? 8 : 4;
}
// The lane count of v5 (16-bit activations) by its own residencies: K = 8 4 blocks per SM, K = 4 8 (v4's 3 / 6 are
// fwd_version_auto(.., 4.0, 6.0)). So K = 8 wherever its blocks fit in two waves. Session 25 (H100, L 4096, graph p50,
// bench/results/s25/dispatch_*/): v4's residencies had picked K = 4 at 528-792 blocks, where K = 8 is faster - the
// default at d_inner 2048 b5 0.528 -> 0.427 ms, b6 0.529 -> 0.513, at d_inner 4096 b3 0.534 -> 0.513.
int fwd_v5_lanes(int64_t blocks, int sms) { return fwd_version_auto(blocks, sms, 4.0, 8.0); }
// The default version (no APRIEL_SCAN_FWD).
int fwd_version_default(int64_t blocks, int sms, bool fp32) {
  if (fp32) return fwd_version_auto(blocks, sms, 4.0, 6.0);
  if ((blocks / 4) * 10 >= 19 * static_cast<int64_t>(sms)) return 107;  // v7's grid: >= 1.9 blocks per SM
  return 100 + fwd_v5_lanes(blocks, sms);
}
int fwd_version(int64_t blocks = 0, int sms = 132, bool fp32 = false) {
  if (const char* env = std::getenv("APRIEL_SCAN_FWD")) {
    const std::string v(env);
    if (v == "v3") return 3;
    if (v == "v4k4") return 4;
    if (v == "v4k8") return 8;
    if (v == "v4") return fwd_version_auto(blocks, sms, 4.0, 6.0);
    if (v == "v5k4") return 104;
    if (v == "v5k8") return 108;
    if (v == "v5") return 100 + fwd_v5_lanes(blocks, sms);
    if (v == "v7") return 107;  // falls back to v5 K = 4 where v7 does not apply (launch_fwd_version)
    if (v == "v7var") return 207;  // packed documents: varlen v7 whenever the documents fit (launch_fwd)
  }
  return fwd_version_default(blocks, sms, fp32);
}

// heads_per_group % 4 != 0 (session 19): the v7 kernel runs ceil(r / 4) blocks per x / B group, the group's heads
// spread evenly over them and the other warps idle, so its time follows its blocks per SM and the head count of its
// largest block, not the work. Both kernels are step functions of their blocks per SM; session 29 fitted them as
// tables to H100 runs at L 4096 (bench/results/s29/dispatch_groups/groups_fwd.json: 6 teachers' shapes, batch 2-8,
// CUDA-graph p50; both scale with L, so only their ratio matters). The session-19 linear estimates missed by up to 19 %
// where the grids step (e.g. Qwen2.5-7B's mixer at b5: v5 0.932 ms picked, v7 0.807).
//   v5: its lane count by fwd_v5_lanes; K = 8, one block per head row, n = ceil(rows / SMs) blocks per SM:
//       max(0.15, 0.085 n) ms; K = 4, two head rows per block, n = ceil(rows / (2 SMs)): max(0.93, 0.165 n).
//   v7: kPartialWave[min(4, n)][largest] for one wave (n = ceil(blocks / SMs) <= 4 blocks per SM); past one wave,
//       each full wave at 4 per SM plus the rest as 2 per SM (4 when it fills 4: the blocks start as others finish).
// E.g. Llama-3.2-3B's mixer (3 heads per group) at b6: v7 0.79 vs v5 0.93 (measured 0.780 / 0.935); Qwen2.5-14B's
// (5: blocks of 3 + 2 heads) at b7 1.405 vs 1.485 (1.442 / 1.518); Qwen2.5-1.5B's (6) at b8 v7 0.56 vs v5 0.51.
double fwd5_estimate_ms(int64_t rows, int sms) {
  if (fwd_v5_lanes(rows, sms) == 8) return std::max(0.15, 0.085 * static_cast<double>((rows + sms - 1) / sms));
  return std::max(0.93, 0.165 * static_cast<double>((rows + 2 * sms - 1) / (2 * sms)));
}
// v7 with partial groups, one wave: [blocks per SM - 1][largest block's heads - 1], ms at L 4096 (measured).
constexpr double kPartialWave[4][4] = {{0.40, 0.40, 0.40, 0.40},
                                       {0.40, 0.555, 0.56, 0.562},
                                       {0.41, 0.573, 0.79, 0.807},
                                       {0.41, 0.578, 0.845, 1.03}};
double fwd7_partial_estimate_ms(int64_t blocks, int largest, int sms) {
  const int h = std::min(4, std::max(1, largest)) - 1;
  const int64_t wave = 4 * static_cast<int64_t>(sms), full = blocks / wave, rest = blocks - full * wave;
  double t = static_cast<double>(full) * kPartialWave[3][h];
  if (rest > 0) {
    const int64_t per_sm = std::min<int64_t>(4, (rest + sms - 1) / sms);
    t += kPartialWave[full == 0 ? per_sm - 1 : (per_sm == 4 ? 3 : 1)][h];
  }
  return t;
}
bool fwd7_partial_wins(const MixerScanParams& p, int sms) {
  const int largest = mixer_scan_v7_group_share(p.heads_per_group, 0).heads;  // block 0's share is the largest
  const int64_t blocks = static_cast<int64_t>(p.batch) * mixer_scan_v7_blocks_per_row(p);
  const int64_t rows = static_cast<int64_t>(p.batch) * (p.d_inner / kN);
  return fwd7_partial_estimate_ms(blocks, largest, sms) < fwd5_estimate_ms(rows, sms);
}

// One forward launch of activation dtype T for a version of fwd_version (K = 16 only for v3: the other lane
// counts were dropped, slower, see docs/notes/scan.md).
template <typename T>
void launch_fwd_version(const MixerScanParams& p, void* stream, int version) {
  switch (version) {
    case 107:
      if constexpr (sizeof(T) == 2) {
        if (mixer_scan_fwd7_applies(p)) { launch_mixer_scan_fwd7<T>(p, stream); break; }
      }
      launch_mixer_scan_fwd5<T, 4>(p, stream);
      break;
    case 104: launch_mixer_scan_fwd5<T, 4>(p, stream); break;
    case 108: launch_mixer_scan_fwd5<T, 8>(p, stream); break;
    case 4: launch_mixer_scan_fwd4<T, 4>(p, stream); break;
    case 8: launch_mixer_scan_fwd4<T, 8>(p, stream); break;
    default: launch_mixer_scan_fwd<T, 16>(p, stream); break;
  }
}

// Varlen scheduling of packed documents (session 17, mixer_scan_plan.cu / mixer_scan_fwd7.cuh kVar). Where the
// dispatcher would run the v5 kernel with documents (batch 1-3 at D 4096: v7's grid of one block per (group,
// sequence) is too small there), one block per (group, DOCUMENT) gives v7 the blocks it needs when the documents
// are short, and loses when a document is long (a document's time is its own length at one block per group: one
// document of 8,192 tokens takes 1.60-1.68 ms that way, v5 0.46). The plan decides on the device from the document
// lengths; both kernels are launched and the one not picked returns at once (no host sync: CUDA graphs replay the
// device's choice). Costs per 32-token tile (H100, bench/results/s17/): a v7 block alone 6.3 us, ~8 at 2-4 blocks
// per SM (7 taken), 8.0 at 4 per SM (b8 L4096 1.02 ms / 128 tiles); the v5 kernel with documents per tile of the
// sequence: D 4096 b1 1.8 us (L8192 0.454-0.467 ms), b2 2.95 us (0.754 ms), b3 4.4 us (L4096 0.56 ms); other mixer
// shapes by their head rows (v5_docs_tile_us). Session 23: any heads per group - the varlen grid's columns are the v7
// forward's blocks per row (kPartial: a group's share of its heads), each with its own document counter.
// APRIEL_SCAN_FWD=v7var forces varlen wherever the documents fit (else v5 with documents runs);
// APRIEL_SCAN_VARLEN=0 turns the automatic choice off.
bool varlen_auto_enabled() {
  const char* env = std::getenv("APRIEL_SCAN_VARLEN");
  return env == nullptr || std::string(env) != "0";
}

// The varlen grid: block_columns = the v7 forward's blocks per sequence (mixer_scan_v7_blocks_per_row: 4 heads of one
// x / B group each, a group's share with kPartial - session 23), each with its own document counter, times
// blocks_per_column (one wave of 4 blocks per SM).
struct VarlenSetup {
  int block_columns, blocks_per_column;
  VarlenPlanCost cost;
};
// The batch-1-3 kernel with documents (v5), us per 32-token tile of the sequence, by its head rows (batch x d_inner /
// 16), piecewise linear through H100 measurements (bench/results/s17/, s23/varlen_groups/: D 576 / 3072 / 4096 at
// batch 1-3): up to ~100 rows 1.55 (latency-bound: one block per head is far from filling the GPU), 256 rows 1.8,
// 512 2.95, from 576 on 4.4 (the lane-count switch), then ~1.48 per 256 rows. (Session 17's rule - 1.8 / 2.95 /
// 1.48 x batch, fitted at D 4096 - put SmolLM2's mixer (D 576) at 4.4 per tile at batch 3 instead of 1.6: the plan
// then picked varlen where it ran 1.6x slower.)
float v5_docs_tile_us(double rows) {
  constexpr double x[] = {108.0, 256.0, 512.0, 576.0, 768.0}, y[] = {1.55, 1.8, 2.95, 4.4, 4.44};
  if (rows <= x[0]) return static_cast<float>(y[0]);
  for (int i = 1; i < 5; ++i)
    if (rows <= x[i]) return static_cast<float>(y[i - 1] + (y[i] - y[i - 1]) * (rows - x[i - 1]) / (x[i] - x[i - 1]));
  return static_cast<float>(y[4] * rows / x[4]);
}

// shape: d_inner, d_xb and heads_per_group of the call (the rest unused).
VarlenSetup varlen_setup(int batch, int seqlen, const MixerScanParams& shape, int sms) {
  VarlenSetup v{};
  v.block_columns = mixer_scan_v7_blocks_per_row(shape);
  v.blocks_per_column = std::max(1, 4 * sms / v.block_columns);
  const char* blocks = std::getenv("APRIEL_SCAN_VARLEN_BLOCKS");  // tests: fewer blocks, several documents each
  if (blocks != nullptr && *blocks != 0) v.blocks_per_column = std::max(1, std::atoi(blocks));
  v.cost.lat_tile = 7.0f;
  // A column's tile at 4 blocks per SM costs in proportion to its busiest block's warps, down to ~half of a full
  // block's (session 19's kPartial measurements: max(0.55, 0.065 x 4 a_max) ms per wave at L 4096; session 23: 3
  // heads per column took ~0.75 x 8 us, Llama-3.2-3B's mixer at b2 L8192, bench/results/s23/).
  const int busiest = mixer_scan_v7_group_share(shape.heads_per_group, 0).heads;
  v.cost.thr_tile = 8.0f * std::max(0.53f, busiest / 4.0f);
  v.cost.slots = 4.0f * sms;
  const float n_tiles = static_cast<float>((seqlen + kChunk - 1) / kChunk);
  v.cost.other_us = n_tiles * v5_docs_tile_us(static_cast<double>(batch) * (shape.d_inner / kN));
  v.cost.margin = 0.9f;
  return v;
}
// The plan into a fresh workspace (int32: kVarlenWorkspaceInts + block columns) on the current stream.
Tensor plan_documents(const int* seq_idx, int batch, int seqlen, const VarlenSetup& v, bool force, void* stream) {
  Tensor ws = at::empty({kVarlenWorkspaceInts + v.block_columns},
                        at::TensorOptions().dtype(at::kInt).device(at::kCUDA, c10::cuda::current_device()));
  launch_plan_documents(seq_idx, batch, seqlen, v.block_columns, v.cost, force ? 1 : 0, ws.data_ptr<int>(), stream);
  return ws;
}

// version: the kernel to run where the plan does not pick varlen (v5 with documents: its kernels return at once
// when the plan picked varlen, fwd_skip); force: varlen whenever the documents fit (APRIEL_SCAN_FWD=v7var).
template <typename T>
void launch_fwd_varlen(MixerScanParams p, void* stream, int version, bool force, int sms) {
  const VarlenSetup v = varlen_setup(p.batch, p.seqlen, p, sms);
  Tensor ws = plan_documents(p.seq_idx, p.batch, p.seqlen, v, force, stream);
  int* w = ws.data_ptr<int>();
  p.var_items = reinterpret_cast<const int4*>(w);
  p.var_count = w + 4 * kVarlenMaxDocs;
  p.fwd_skip = w + 4 * kVarlenMaxDocs + 1;
  p.var_next = w + kVarlenWorkspaceInts;
  launch_fwd_version<T>(p, stream, version);  // returns at once where the plan picked varlen
  launch_mixer_scan_fwd7_varlen<T>(p, v.blocks_per_column, stream);  // returns at once where it did not
  // (ws goes back to the caching allocator now: later work on this stream runs after both kernels)
}

// The forward kernel launch_fwd runs for p: version (as fwd_version, 207 resolved) and whether the varlen plan runs
// (packed documents at small grids: v5 with documents or the varlen v7 kernel, picked on the device).
struct FwdChoice {
  int version;
  bool varlen;
};
FwdChoice fwd_choice(const MixerScanParams& p, at::ScalarType st, int sms) {
  int version = fwd_version(static_cast<int64_t>(p.batch) * (p.d_inner / kN), sms, st == at::kFloat);
  const bool forced = std::getenv("APRIEL_SCAN_FWD") != nullptr;
  const bool varlen = p.seq_idx != nullptr && st != at::kFloat && mixer_scan_fwd7_applies(p) &&
                      (version == 207 || (!forced && varlen_auto_enabled() && (version == 104 || version == 108)));
  if (varlen) return {version, true};
  if (version == 207) version = 107;  // v7var without documents (or where v7 does not apply): v7
  // The default's v7 with partial groups only where the estimate says it wins, on either side of the full-group grid
  // rule (session 29: e.g. Qwen2.5-7B's mixer at b4, 896 head rows, v7 0.562 vs v5 0.584 ms); forced v7 runs wherever
  // it applies. (With documents, v5 stays below the rule: the varlen plan above decides there.)
  if (!forced && p.heads_per_group % 4 != 0) {
    if (version == 107 && !fwd7_partial_wins(p, sms))
      version = 100 + fwd_v5_lanes(static_cast<int64_t>(p.batch) * (p.d_inner / kN), sms);
    else if ((version == 104 || version == 108) && p.seq_idx == nullptr && mixer_scan_fwd7_applies(p) &&
             fwd7_partial_wins(p, sms))
      version = 107;
  }
  return {version, false};
}

// p.ckpt_sub (sub-chunk checkpoints): the v7 kernels write them (and set their flag), and since session 31 the 16-bit
// v5 kernels (K = 8 with TMA staging, K = 4) and the varlen v7 kernel for whole groups of 4 heads.
void launch_fwd(const MixerScanParams& p, at::ScalarType st) {
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const int sms = sm_count();
  const FwdChoice c = fwd_choice(p, st, sms);
  const int version = c.version;
  if (c.varlen) {
    // v7var's fallback (more documents than the plan lists): v5 with documents (v5 K = 4 where the default is v7:
    // only the v5 kernels check fwd_skip, so the v7 kernel with documents keeps its code)
    int other = version;
    if (version == 207) {
      other = fwd_version_default(static_cast<int64_t>(p.batch) * (p.d_inner / kN), sms, false);
      if (other == 107) other = 104;
    }
    if (st == at::kBFloat16) launch_fwd_varlen<__nv_bfloat16>(p, stream, other, version == 207, sms);
    else launch_fwd_varlen<__half>(p, stream, other, version == 207, sms);
    return;
  }
  if (st == at::kBFloat16) launch_fwd_version<__nv_bfloat16>(p, stream, version);
  else if (st == at::kHalf) launch_fwd_version<__half>(p, stream, version);
  else launch_fwd_version<float>(p, stream, version);
}

// Whether the forward would run a kernel that writes sub-chunk checkpoints (and the backward would load them), for
// 16-bit activations of this mixer shape with 16-byte aligned rows: v7, v5 (dt_rank <= 16; K = 8 where its TMA maps
// encode, which aligned rows give), and under the varlen plan (packed documents at small grids; v5 or the varlen v7,
// picked on the device) both of its kernels where groups hold whole blocks of 4 heads. apriel_kernels.mixer_scan.
// _checkpoint_mode asks before it sizes the buffer: the fake and the kernel agree, and no buffer is sized for rows that
// nobody writes.
bool mixer_scan_fwd_writes_sub_checkpoints(int64_t batch, int64_t d_inner, int64_t d_xb, int64_t dt_rank,
                                           bool documents) {
  TORCH_CHECK(batch >= 0 && d_xb >= kN && d_xb % kN == 0 && d_inner >= d_xb && d_inner % d_xb == 0 && dt_rank >= 1,
              "mixer_scan_fwd_writes_sub_checkpoints: expected batch >= 0, d_xb a positive multiple of 16, d_inner a "
              "multiple of d_xb, dt_rank >= 1; got ", batch, ", ", d_inner, ", ", d_xb, ", ", dt_rank);
  MixerScanParams p{};
  p.batch = static_cast<int>(batch);
  p.d_inner = static_cast<int>(d_inner);
  p.d_xb = static_cast<int>(d_xb);
  p.dt_rank = static_cast<int>(dt_rank);
  p.heads_per_group = static_cast<int>(d_inner / d_xb);
  p.zxbc_vec16 = p.dt_vec16 = p.dy_vec16 = true;
  static const int kDocMarker = 0;
  p.seq_idx = documents ? &kDocMarker : nullptr;  // (only its presence is read)
  // (one head per group: the backward's kMulti kernel has no sub-chunk variant - mixer_scan_bwd7.cuh launch_for)
  if (p.heads_per_group == 1 || !mixer_scan_bwd7_supports(p)) return false;
  const FwdChoice c = fwd_choice(p, at::kBFloat16, sm_count());
  if (c.varlen) return p.heads_per_group % 4 == 0;  // (the varlen kernel with partial groups writes none)
  return c.version == 107 || c.version == 104 || c.version == 108;
}

// Backward version. Default: v7 (mixer_scan_bwd7.cuh: the adjoint in the forward v7's tensor-core layout, one
// warp per head, 4 heads of a group per block) for 16-bit activations where it applies (mixer_scan_bwd7_supports),
// with the sequence split (bwd7_segments) where batch x d_inner / 64 blocks do not fill the GPU; v4
// (mixer_scan_bwd4.cuh: K = 8 lanes per channel, one block per head) otherwise (fp32, unaligned rows, ...).
// H100, D 4096, bwd alone (scripts/diag/scan_bwd_split.py, bench/results/s7/): b8 L4096 6.70 ms (v7) vs 8.70 (v4);
// b4 L4096 3.40 vs 4.48; b3 2.89 (v7, 4 segments) vs 3.49; b2 1.90 (2 segments) vs 2.38; b1 L8192 2.01 (4
// segments; unsplit v7 5.46: 64 blocks) vs 2.38. APRIEL_SCAN_BWD forces a version (read at each call): v7 (where it applies,
// else v4), v4, v3 (the session-1 kernel). All produce the same outputs.
std::string bwd_version() {
  const char* env = std::getenv("APRIEL_SCAN_BWD");
  return env != nullptr ? std::string(env) : std::string("auto");
}

// Segments per sequence for the v7 backward (session 7, scan_params.h: the sequence split), by best_segments
// (split_rule.h: waves of the main kernel's blocks, batch x d_inner / 64 x segments, plus the carry pre-pass). The S in
// 1 .. 8 (at most one per tile) with the least estimate wins: b1 / b2 / b3 at D 4096 -> 4 / 2 / 4, b4 / b8 -> 1.
// APRIEL_SCAN_BWD_SEGMENTS=n forces n (capped at the tile count).
int bwd7_segments(const MixerScanParams& p) {
  const int64_t max_s = std::min<int64_t>(8, p.n_chunks);
  std::string bad;
  const int64_t forced = forced_segments("APRIEL_SCAN_BWD_SEGMENTS", p.n_chunks, &bad);
  TORCH_CHECK(bad.empty(), "APRIEL_SCAN_BWD_SEGMENTS: expected a positive integer, got '", bad, "'");
  if (forced > 0) return static_cast<int>(forced);
  constexpr double kPrePass = 0.17;  // H100 b1 L8192, 4 segments: pre-pass 0.205 ms, main kernel 1.63 ms
  const double blocks = static_cast<double>(p.batch) * mixer_scan_bwd7_blocks_per_row(p), slots = 2.0 * sm_count();
  return best_segments(blocks, slots, max_s, kPrePass);
}

// Segments of the v7 backward for these params, 0 where v4 / v3 run (the host epilogue depends on it: fused
// group sums, per-segment partial rows).
// heads_per_group % 4 != 0 (kSpan, session 20: blocks of 4 consecutive heads across group boundaries): v7 wherever it
// applies (>= 2 heads per group; 1 runs v4). H100, bwd alone at L 4096, b1 / b4 / b8, session 19's default (its v7
// with idle warps where at least 3 / 4 had a head, else v4) -> kSpan, the same call (bench/results/s20/ab_span/):
// 3 heads per group (Llama-3.2-3B's mixer) 0.95 / 3.12 / 6.15 -> 0.87 / 2.94 / 5.46 ms; 5 (Qwen2.5-14B) 2.14 / 5.45 /
// 10.60 (v4) -> 1.33 / 4.70 / 8.96; 6 (Qwen2.5-1.5B) b8 3.12 -> 2.94; 7 (Qwen2.5-7B) 1.03 / 3.36 / 6.59 -> 1.04 /
// 3.39 / 6.67 (the one loss, 1 %); 2 (Qwen3-1.7B, group sums in the kernel) 1.04 / 2.36 / 4.48-4.62 (v4) -> 0.55-0.77
// / 1.79 / 3.21; the 4-per-group kernels unchanged (SASS identical).
// One head per group (kMulti, session 24; 4 | heads): SmolLM2-1.7B's mixer (2048 / 2048) at L 4096, b1 / b4 / b8, v4
// -> v7: 1.03 / 2.28 / 4.59 -> 0.50 / 1.73 / 3.18 ms (bench/results/s24/multi_a91bf6b/).
int bwd_v7_segments(const MixerScanParams& p, at::ScalarType st) {
  if (st == at::kFloat || !mixer_scan_bwd7_supports(p)) return 0;
  const std::string v = bwd_version();
  if (v != "v7" && v != "auto") return 0;
  return bwd7_segments(p);
}

// v7: the caller's bwd_v7_segments decision (made once: its host epilogue depends on it too).
void launch_bwd(const MixerScanParams& p, at::ScalarType st, bool v7) {
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  if (v7) {
    if (p.bwd_segments > 1) {
      if (st == at::kBFloat16) launch_mixer_scan_bwd7_carry<__nv_bfloat16>(p, stream);
      else launch_mixer_scan_bwd7_carry<__half>(p, stream);
    }
    if (st == at::kBFloat16) launch_mixer_scan_bwd7<__nv_bfloat16>(p, stream);
    else launch_mixer_scan_bwd7<__half>(p, stream);
    return;
  }
  if (bwd_version() != "v3") {
    if (st == at::kBFloat16) launch_mixer_scan_bwd4<__nv_bfloat16>(p, stream);
    else if (st == at::kHalf) launch_mixer_scan_bwd4<__half>(p, stream);
    else launch_mixer_scan_bwd4<float>(p, stream);
    return;
  }
  if (st == at::kBFloat16) launch_mixer_scan_bwd<__nv_bfloat16, 16>(p, stream);
  else if (st == at::kHalf) launch_mixer_scan_bwd<__half, 16>(p, stream);
  else launch_mixer_scan_bwd<float, 16>(p, stream);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> mixer_scan_fwd_cuda(
    const Tensor& zxbc, const Tensor& dt_low, const Tensor& conv_weight, const OptT& conv_bias,
    const Tensor& dt_proj_weight, const Tensor& dt_proj_bias, const Tensor& A_log, const Tensor& Dskip,
    const OptT& init_ssm, const OptT& init_conv, const OptT& seq_idx, int64_t d_inner, int64_t d_xb,
    int64_t d_state, bool repeat, int64_t checkpoints) {
  const Dims d = check_inputs(zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, Dskip,
                              init_ssm, init_conv, seq_idx, d_inner, d_xb, d_state, repeat);
  TORCH_CHECK(checkpoints >= 0 && checkpoints <= 2, "checkpoints: expected 0 (none), 1 (per tile) or 2 (per tile and "
              "sub-chunk), got ", checkpoints);
  c10::cuda::CUDAGuard guard(zxbc.device());
  auto f32 = zxbc.options().dtype(at::kFloat);
  Tensor y = at::empty({d.b, d.L, d.D}, zxbc.options());
  Tensor final_ssm = at::empty({d.b, d.D / kN, kN, kN}, f32);
  Tensor final_conv = at::empty({d.b, d.X, d.W - 1}, zxbc.options());
  // 2: one flat buffer (ckpt_layout; mixer_scan_bwd_cuda recognises it by its size)
  const auto [tile_rows, flag_at] = ckpt_layout(d);
  Tensor ckpt = checkpoints == 2   ? at::empty({flag_at + 1}, f32)
                : checkpoints == 1 ? at::empty({d.b, d.n_chunks, d.D, kN}, f32)
                                   : at::empty({0}, f32);
  if (checkpoints == 2) ckpt.narrow(0, flag_at, 1).zero_();  // (until a kernel writes the sub-chunk rows)
  if (d.b == 0) return {y, final_ssm, final_conv, ckpt};
  if (d.L == 0) {
    final_ssm.copy_(init_ssm ? init_ssm->view_as(final_ssm) : at::zeros_like(final_ssm));
    if (init_conv) final_conv.copy_(compact_init_conv(*init_conv, d)); else final_conv.zero_();
    return {y, final_ssm, final_conv, ckpt};
  }
  std::vector<Tensor> keep;
  MixerScanParams p = fill_params(zxbc, dt_low, d, repeat, keep, conv_weight, conv_bias, dt_proj_weight,
                                  dt_proj_bias, A_log, Dskip, init_ssm, init_conv, seq_idx,
                                  /*convert_params=*/fwd_version() == 3);
  p.y = y.data_ptr(); p.final_ssm = final_ssm.data_ptr<float>(); p.final_conv = final_conv.data_ptr();
  p.ckpt = checkpoints > 0 ? ckpt.data_ptr<float>() : nullptr;
  if (checkpoints == 2) {
    p.ckpt_sub = p.ckpt + tile_rows;
    p.ckpt_sub_flag = p.ckpt + flag_at;
  }
  launch_fwd(p, zxbc.scalar_type());
  return {y, final_ssm, final_conv, ckpt};
}

// The varlen plan alone (tests, diagnostics): the workspace launch_fwd would use for these documents -
// items (kVarlenMaxDocs x 4: sequence, first token, end token, 0), count, skip, then the per-column counters.
Tensor mixer_scan_varlen_plan_cuda(const Tensor& seq_idx, int64_t d_inner, int64_t d_xb, bool force) {
  TORCH_CHECK(seq_idx.is_cuda() && seq_idx.scalar_type() == at::kInt && seq_idx.dim() == 2,
              "seq_idx: expected a (batch, seqlen) int32 CUDA tensor, got ", seq_idx.scalar_type(), " ",
              seq_idx.sizes());
  TORCH_CHECK(seq_idx.size(0) >= 1 && seq_idx.size(1) >= 1, "seq_idx: expected batch >= 1 and seqlen >= 1");
  TORCH_CHECK(d_xb >= kN && d_xb % kN == 0, "d_xb: expected a positive multiple of 16, got ", d_xb);
  TORCH_CHECK(d_inner >= d_xb && d_inner % d_xb == 0, "d_inner: expected a positive multiple of d_xb (", d_xb,
              "), got ", d_inner);
  MixerScanParams shape{};
  shape.d_inner = static_cast<int>(d_inner); shape.d_xb = static_cast<int>(d_xb);
  shape.heads_per_group = static_cast<int>(d_inner / d_xb);
  c10::cuda::CUDAGuard guard(seq_idx.device());
  const Tensor sq = seq_idx.contiguous();
  const VarlenSetup v = varlen_setup(static_cast<int>(sq.size(0)), static_cast<int>(sq.size(1)), shape, sm_count());
  return plan_documents(sq.data_ptr<int>(), static_cast<int>(sq.size(0)), static_cast<int>(sq.size(1)), v, force,
                        c10::cuda::getCurrentCUDAStream().stream());
}

std::vector<Tensor> mixer_scan_bwd_cuda(
    const Tensor& zxbc, const Tensor& dt_low, const Tensor& conv_weight, const OptT& conv_bias,
    const Tensor& dt_proj_weight, const Tensor& dt_proj_bias, const Tensor& A_log, const Tensor& Dskip,
    const OptT& init_ssm, const OptT& init_conv, const OptT& seq_idx, int64_t d_inner, int64_t d_xb,
    int64_t d_state, bool repeat, const Tensor& dy, const OptT& dfinal_ssm, const OptT& dfinal_conv,
    const OptT& checkpoints) {
  const Dims d = check_inputs(zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, Dskip,
                              init_ssm, init_conv, seq_idx, d_inner, d_xb, d_state, repeat);
  TORCH_CHECK(dy.sizes() == at::IntArrayRef({d.b, d.L, d.D}), "dy: expected (batch, seqlen, d_inner)");
  c10::cuda::CUDAGuard guard(zxbc.device());
  auto f32 = zxbc.options().dtype(at::kFloat);
  const auto st = zxbc.scalar_type();
  const int64_t hw = d.W - 1;
  std::vector<Tensor> keep;
  MixerScanParams p = fill_params(zxbc, dt_low, d, repeat, keep, conv_weight, conv_bias, dt_proj_weight,
                                  dt_proj_bias, A_log, Dskip, init_ssm, init_conv, seq_idx);
  Tensor ckpt;
  const auto [tile_rows, flag_at] = ckpt_layout(d);
  if (checkpoints && checkpoints->numel() == flag_at + 1 && tile_rows > 0) {  // with sub-chunk checkpoints
    ckpt = checkpoints->contiguous();
    p.ckpt_sub_in = ckpt.data_ptr<float>() + tile_rows;
    p.ckpt_sub_flag_in = ckpt.data_ptr<float>() + flag_at;
  } else if (checkpoints && checkpoints->numel() == tile_rows) {
    ckpt = checkpoints->contiguous();
  } else if (d.L > 0 && d.b > 0) {  // forward ran without checkpoints: recompute them
    ckpt = at::empty({d.b, d.n_chunks, d.D, kN}, f32);
    Tensor y = at::empty({d.b, d.L, d.D}, zxbc.options());
    Tensor fs = at::empty({d.b, d.D, kN}, f32), fc = at::empty({d.b, d.X, hw}, zxbc.options());
    MixerScanParams q = p;
    q.y = y.data_ptr(); q.final_ssm = fs.data_ptr<float>(); q.final_conv = fc.data_ptr(); q.ckpt = ckpt.data_ptr<float>();
    launch_fwd(q, st);
  }
  Tensor dzxbc = at::empty({d.b, d.L, 2 * d.D + 2 * d.X}, zxbc.options());
  // Backward v7 with whole groups in a block (4 heads per group; 2 when 4 divides the head count) sums d(conv input) /
  // dB in the kernel (no fp32 (b, L, D) partial buffers, no head-sum kernel, dfinal_conv added by the kernel).
  Tensor dy_c = dy.to(st).contiguous();
  p.dy = dy_c.data_ptr();
  p.dy_vec16 = reinterpret_cast<uintptr_t>(p.dy) % 16 == 0 && (d.D * dy_c.element_size()) % 16 == 0;
  const int nseg = d.L > 0 && d.b > 0 ? bwd_v7_segments(p, st) : 0;
  const bool v7 = nseg > 0;
  // (kSpan at 2 heads per group: every block holds two whole groups when 4 divides the head count)
  const bool fused = v7 && (d.r == 4 || d.r == 1 || (d.r == 2 && (d.D / kN) % 4 == 0));  // (r = 1: kMulti)
  p.bwd_fused_sums = fused;
  // Sequence split (v7 only): whole-sequence partials get one row per (b, segment).
  // (seg_tiles = ceil(n_chunks / S), then S = ceil(n_chunks / seg_tiles): no empty segment)
  const int64_t seg_tiles = (d.n_chunks + std::max(nseg, 1) - 1) / std::max(nseg, 1);
  const int64_t S = d.n_chunks > 0 ? (d.n_chunks + seg_tiles - 1) / seg_tiles : 1, bs = d.b * S;
  p.bwd_segments = static_cast<int>(S);
  p.seg_tiles = static_cast<int>(seg_tiles);
  Tensor seg_carry = S > 1 ? at::empty({d.b, S, 2, d.D, kN}, f32) : Tensor();
  const int64_t seg_len = static_cast<int64_t>(p.seg_tiles) * kChunk;
  Tensor dx_edge = S > 1 && fused ? at::empty({bs, hw, d.X}, f32) : Tensor();
  // Without fused sums, d(conv input) / dB leave the kernel in parts (scan_params.h: bwd_parts): v7 one per (block,
  // group) at part block + group, v4 one per head.
  const int64_t G = d.X / kN;
  const int64_t nblk = mixer_scan_bwd7_blocks_per_row(p);  // the v7 kernel's blocks per sequence
  const int64_t parts = fused ? 0 : v7 ? nblk + G - 1 : d.D / kN;
  p.bwd_parts = static_cast<int>(parts);
  Tensor dx_part = at::empty({fused ? 0 : d.b, d.L, parts, kN}, f32);
  Tensor dB_part = at::empty({fused ? 0 : d.b, d.L, parts, kN}, f32);
  // v7 computes the dt_proj gradients itself (per-block d(dt_low) partials, per-sequence d W / d b): no fp32 (b, L, D)
  // d(dt_pre) buffer and no GEMMs over it.
  Tensor ddt_pre = v7 ? at::empty({0}, f32) : at::empty({d.b, d.L, d.D}, f32);
  Tensor ddt_low_part = v7 ? at::empty({d.b, d.L, nblk, kN}, f32) : Tensor();
  Tensor ddt_w_part = v7 ? at::empty({bs, d.D, kN}, f32) : Tensor();
  Tensor ddt_b_part = v7 ? at::empty({bs, d.D}, f32) : Tensor();
  Tensor dAlog_part = at::empty({bs, d.D, kN}, f32);
  Tensor dD_part = at::empty({bs, d.D}, f32), dcb_part = at::empty({bs, d.D}, f32);
  // (v7 writes every row of dic_part: each block its segment-start conv rows)
  Tensor dcw_part = at::empty({bs, d.D, d.W}, f32), dic_part = v7 ? at::empty({bs, d.D, hw}, f32) : at::zeros({bs, d.D, hw}, f32);
  Tensor dinit_ssm_seg = at::empty({bs, d.D, kN}, f32);
  Tensor dfs = dfinal_ssm && dfinal_ssm->numel() ? f32c(*dfinal_ssm) : Tensor();
  Tensor dfc = dfinal_conv && dfinal_conv->numel() ? f32c(*dfinal_conv) : Tensor();
  if (d.L > 0 && d.b > 0) {
    p.dfinal_conv = fused && dfc.defined() ? dfc.data_ptr<float>() : nullptr;
    {
      const char* bc = std::getenv("APRIEL_SCAN_BWD_BC");
      p.bwd_f32_bc = bc != nullptr && std::string(bc) == "f32";
    }
    p.dfinal_ssm = dfs.defined() ? dfs.data_ptr<float>() : nullptr;
    p.ckpt_in = ckpt.data_ptr<float>();
    p.dzxbc = dzxbc.data_ptr(); p.dx_part = dx_part.data_ptr<float>(); p.dB_part = dB_part.data_ptr<float>();
    p.ddt_pre = ddt_pre.data_ptr<float>(); p.dA_log_part = dAlog_part.data_ptr<float>();
    if (v7) {
      p.ddt_low_part = ddt_low_part.data_ptr<float>();
      p.ddt_w_part = ddt_w_part.data_ptr<float>();
      p.ddt_b_part = ddt_b_part.data_ptr<float>();
    }
    p.dD_part = dD_part.data_ptr<float>(); p.dconv_b_part = dcb_part.data_ptr<float>();
    p.dconv_w_part = dcw_part.data_ptr<float>(); p.dinit_conv_part = dic_part.data_ptr<float>();
    p.dinit_ssm = dinit_ssm_seg.data_ptr<float>();
    if (S > 1) {
      p.seg_carry = seg_carry.data_ptr<float>();
      p.dx_edge = fused ? dx_edge.data_ptr<float>() : nullptr;
    }
    launch_bwd(p, st, v7);
  } else {
    for (Tensor* t : {&dx_part, &dB_part, &ddt_pre, &dAlog_part, &dD_part, &dcb_part, &dcw_part})
      t->zero_();
    dinit_ssm_seg.copy_(dfs.defined() ? dfs.view_as(dinit_ssm_seg) : at::zeros_like(dinit_ssm_seg));
  }
  // The parameter gradients (and a split's halo rows) from their fp32 partial rows: one kernel
  // (mixer_scan_finalize.cu; session 22 - was ~18 torch reductions, dtype copies and a strided copy).
  const int64_t conv_channels = repeat ? d.D : d.X;
  Tensor dA = at::empty({d.D, kN}, A_log.options()), dDo = at::empty({d.D}, Dskip.options());
  Tensor dcw = at::empty({conv_channels, d.W}, conv_weight.options());
  Tensor dcb = conv_bias ? at::empty({conv_channels}, conv_bias->options()) : Tensor();
  Tensor ddt_low, ddt_w, ddt_b;
  if (v7) {
    ddt_low = at::empty({d.b, d.L, d.R}, dt_low.options());
    ddt_w = at::empty({d.D, d.R}, dt_proj_weight.options());
    ddt_b = at::empty({d.D}, dt_proj_bias.options());
  }
  // Sequence split: segment s >= 1's conv-state rows are its contribution to the d(conv input) of the hw tokens
  // before it (segment s - 1's last hw tokens, which the kernel wrote without it: into dx_edge with fused sums - the
  // finalize kernel adds both into dzxbc - else into its parts: the head-sum kernel adds x_halo).
  Tensor x_halo = S > 1 && !fused ? at::empty({d.b, S - 1, hw, d.X}, f32) : Tensor();
  {
    FinalizeArgs a{};
    a.batch = d.b; a.seqlen = d.L;
    a.D = static_cast<int>(d.D); a.X = static_cast<int>(d.X); a.r = static_cast<int>(d.r);
    a.W = static_cast<int>(d.W); a.R = static_cast<int>(d.R);
    a.repeat = repeat; a.bs = static_cast<int>(bs);
    if (v7) {
      a.ddt_low_part = ddt_low_part.data_ptr<float>(); a.nblk = static_cast<int>(nblk);
      a.ddt_low = ddt_low.data_ptr();
      a.dw_part = ddt_w_part.data_ptr<float>(); a.dw = ddt_w.data_ptr(); a.dw_dtype = param_dtype(ddt_w);
      a.db_part = ddt_b_part.data_ptr<float>(); a.db = ddt_b.data_ptr(); a.db_dtype = param_dtype(ddt_b);
    }
    a.dA_part = dAlog_part.data_ptr<float>(); a.dA = dA.data_ptr(); a.dA_dtype = param_dtype(dA);
    a.dD_part = dD_part.data_ptr<float>(); a.dD = dDo.data_ptr(); a.dD_dtype = param_dtype(dDo);
    a.dcw_part = dcw_part.data_ptr<float>(); a.dcw = dcw.data_ptr(); a.dcw_dtype = param_dtype(dcw);
    a.dcb_part = dcb_part.data_ptr<float>();
    if (dcb.defined()) { a.dcb = dcb.data_ptr(); a.dcb_dtype = param_dtype(dcb); }
    a.segments = static_cast<int>(S); a.seg_len = seg_len;
    if (S > 1) {
      a.dic_part = dic_part.data_ptr<float>();
      a.dx_edge = fused ? dx_edge.data_ptr<float>() : nullptr;
      a.dzxbc = dzxbc.data_ptr();
      a.x_halo = fused ? nullptr : x_halo.data_ptr<float>();
    }
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    if (st == at::kBFloat16) launch_mixer_scan_finalize<__nv_bfloat16>(a, stream);
    else if (st == at::kHalf) launch_mixer_scan_finalize<__half>(a, stream);
    else launch_mixer_scan_finalize<float>(a, stream);
  }
  // Segment 0's rows are the sequence's initial-state gradients (only an initial state takes them).
  Tensor dic;  // (b, X, hw): the r head copies of each x group summed
  if (init_conv)
    dic = dic_part.view({d.b, S, d.D, hw}).select(1, 0).view({d.b, G, d.r, kN, hw}).sum(2).view({d.b, d.X, hw});
  // Gradient of the final conv state: the last W-1 x inputs (of the last document), else the initial state. Without
  // fused sums the x part goes to the head-sum kernel as dfc_rows.
  Tensor dfc_rows;  // (b, hw, X)
  if (dfc.defined()) {
    if (!fused) dfc_rows = at::zeros({d.b, hw, d.X}, f32);
    for (int64_t k = 0; k < hw; ++k) {
      const int64_t pos = d.L - hw + k;
      Tensor g = dfc.select(2, k);  // (b, X)
      if (seq_idx) {
        const int64_t src = pos >= 0 ? pos : 0;
        g = g * seq_idx->select(1, src).eq(seq_idx->select(1, d.L - 1)).to(at::kFloat).unsqueeze(1);
      }
      if (pos < 0) {
        if (dic.defined()) dic.select(2, hw + pos).add_(g);
      } else if (!fused) {
        dfc_rows.select(1, k).copy_(g);  // (fused: the kernel added it)
      }
    }
  }
  // dzxbc's x and B slices: one kernel adds each group's parts of dx_part / dB_part (+ dfc_rows, x_halo) and writes
  // both slices (mixer_scan_head_sum.cu; was two torch sums into fp32 (b, L, X) temporaries and two strided copies).
  if (!fused) {
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    HeadSumArgs a{};
    a.dx_part = dx_part.data_ptr<float>(); a.dB_part = dB_part.data_ptr<float>(); a.dzxbc = dzxbc.data_ptr();
    a.batch = d.b; a.seqlen = d.L;
    a.D = static_cast<int>(d.D); a.X = static_cast<int>(d.X); a.r = static_cast<int>(d.r);
    a.parts = static_cast<int>(parts); a.heads_per_part = v7 ? 4 : 1; a.group_offset = v7;
    a.dfc_rows = dfc_rows.defined() ? dfc_rows.data_ptr<float>() : nullptr;
    a.hw = static_cast<int>(hw);
    a.x_halo = x_halo.defined() ? x_halo.data_ptr<float>() : nullptr;
    a.segments = static_cast<int>(S); a.seg_len = seg_len;
    if (st == at::kBFloat16) launch_mixer_scan_head_sum<__nv_bfloat16>(a, stream);
    else if (st == at::kHalf) launch_mixer_scan_head_sum<__half>(a, stream);
    else launch_mixer_scan_head_sum<float>(a, stream);
  }
  // dt_proj (v4): dt_pre = dt_low W^T + b, the bias again inside softplus -> d bias = 2 * sum d(dt_pre).
  if (!v7) {
    Tensor ddt2 = ddt_pre.view({d.b * d.L, d.D});
    ddt_low = ddt2.mm(f32c(dt_proj_weight)).view({d.b, d.L, d.R}).to(dt_low.scalar_type());
    // d W = ddt^T dt_low and d b = 2 sum_t ddt in ONE pass over the fp32 (b L, D) buffer: a ones column
    // appended to dt_low makes the bias sum the GEMM's last output column.
    Tensor dtl1 = at::cat({dt_low.reshape({d.b * d.L, d.R}).to(at::kFloat), at::ones({d.b * d.L, 1}, f32)}, 1);
    Tensor gwb = ddt2.t().mm(dtl1);  // (D, R + 1)
    ddt_w = gwb.narrow(1, 0, d.R).to(dt_proj_weight.scalar_type()).contiguous();
    ddt_b = (gwb.select(1, d.R) * 2).to(dt_proj_bias.scalar_type());  // the product is a fresh contiguous tensor
  }
  auto empty = [&] { return zxbc.new_empty({0}); };  // a fresh one per absent input: outputs must not alias
  Tensor dinit_conv = empty();
  if (init_conv) {
    const Tensor& ic = *init_conv;
    Tensor full = at::zeros(ic.sizes(), f32);
    Tensor tail = full.narrow(2, ic.size(2) - hw, hw);
    if (ic.size(1) == d.X) {
      tail.copy_(dic);
    } else {  // D-channel layout: the kernel read the first copy of each X channel
      auto src = at::arange(d.X, zxbc.options().dtype(at::kLong));
      tail.index_copy_(1, (src.div(kN, "floor") * kN * d.r) + src.remainder(kN), dic);
    }
    dinit_conv = full.to(ic.scalar_type());
  }
  Tensor dinit_ssm = empty();
  if (init_ssm)
    dinit_ssm = dinit_ssm_seg.view({d.b, S, d.D, kN}).select(1, 0).contiguous().view(init_ssm->sizes())
                    .to(init_ssm->scalar_type());
  return {dzxbc, ddt_low, dcw, conv_bias ? dcb : empty(), ddt_w, ddt_b, dA, dDo, dinit_ssm, dinit_conv};
}

}  // namespace
}  // namespace apriel

TORCH_LIBRARY_FRAGMENT(apriel_C, m) {
  // Fused mixer scan forward: y, final SSM state (b, D/N, N, N) fp32, final conv state (b, X, W-1),
  // fp32 state checkpoints for the backward: checkpoints 0 none (empty), 1 before every 32-token tile (b, ceil(L/32),
  // D, N), 2 that and the states after tokens 7, 15, 23 of every tile, flat (mixer_scan_fwd_cuda).
  m.def("mixer_scan_fwd(Tensor zxbc, Tensor dt_low, Tensor conv_weight, Tensor? conv_bias, Tensor dt_proj_weight, "
        "Tensor dt_proj_bias, Tensor A_log, Tensor D, Tensor? initial_ssm_state, Tensor? initial_conv_state, "
        "Tensor? seq_idx, int d_inner, int d_xb, int d_state, bool repeat_kv_before_conv, int checkpoints) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Its backward: [dzxbc, ddt_low, dconv_weight, dconv_bias, ddt_proj_weight, ddt_proj_bias, dA_log, dD,
  // dinitial_ssm_state, dinitial_conv_state] (empty for absent inputs).
  m.def("mixer_scan_bwd(Tensor zxbc, Tensor dt_low, Tensor conv_weight, Tensor? conv_bias, Tensor dt_proj_weight, "
        "Tensor dt_proj_bias, Tensor A_log, Tensor D, Tensor? initial_ssm_state, Tensor? initial_conv_state, "
        "Tensor? seq_idx, int d_inner, int d_xb, int d_state, bool repeat_kv_before_conv, Tensor dy, "
        "Tensor? dfinal_ssm_state, Tensor? dfinal_conv_state, Tensor? checkpoints) -> Tensor[]");
  // Whether a 16-bit forward of this shape runs a kernel that writes sub-chunk checkpoints (checkpoints = 2).
  m.def("mixer_scan_fwd_writes_sub_checkpoints(int batch, int d_inner, int d_xb, int dt_rank, bool documents) -> bool",
        &apriel::mixer_scan_fwd_writes_sub_checkpoints);
  // The varlen plan of a packed-documents forward (mixer_scan_plan.cu), for tests and diagnostics.
  m.def("mixer_scan_varlen_plan(Tensor seq_idx, int d_inner, int d_xb, bool force) -> Tensor");
}

TORCH_LIBRARY_IMPL(apriel_C, CUDA, m) {
  m.impl("mixer_scan_fwd", &apriel::mixer_scan_fwd_cuda);
  m.impl("mixer_scan_bwd", &apriel::mixer_scan_bwd_cuda);
  m.impl("mixer_scan_varlen_plan", &apriel::mixer_scan_varlen_plan_cuda);
}
