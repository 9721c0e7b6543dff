// Fused Apriel-H1 decode step, version 3 (opt-in: APRIEL_STEP_KERNEL=v3; q = 1 with fp16/bf16 activations
// on sm_90 - every other call runs v2). Same semantics and thread -> channel mapping as v2
// (step_kernel_v2.cuh): one thread per mixer channel, the r repeats of an x source channel in one warp,
// the conv window shuffled from the repeat-0 lane.
//
// Why a v3: v2 measured ~1.5 TB/s at b64 and ~1.86 TB/s at b256 (50-62 % of the copy ceiling), with hot
// L2 ~= cold DRAM and bf16 state barely faster than fp32, i.e. not bound by DRAM bytes but by per-warp
// overhead and bytes in flight: every (channel warp, sequence) re-read its ~3.5 KB of parameters, redid
// 16 expf on A_log, read its 2 KB of state with four 16-byte loads at a 64-B lane stride (64 L1
// wavefronts instead of 16) and stored it the same way, and the state in flight cost registers
// (32-48 KB per SM). v3 changes the unit of work to a WARP OWNING A CHANNEL SLICE FOR A RUN OF SEQUENCES:
//   * parameters are loaded (and -exp(A_log) computed) once per warp, for up to 32 sequences;
//   * the warp's slice of a slot's state is r contiguous chunks (w channels x 64 B: 512 B for H1),
//     copied global -> shared by the TMA (cp.async.bulk, completion on a per-stage mbarrier) and back
//     shared -> global (cp.async.bulk bulk_group): no register cost and no LSU wavefronts for the
//     bulk bytes. kStages stages per warp, refilled one iteration after use, so ~kStages-1 sequences'
//     states are in flight per warp (12-16 warps/SM: ~70-100 KB per SM, vs ~40 KB needed);
//   * the small per-sequence inputs (z, x, B, C, dt_low, conv row) are register-prefetched one sequence
//     ahead; the slot indices of the warp's run sit one per lane (shuffled out);
//   * shared-memory reads/writes of the state are bank-conflict free: lane l's 64 B (fp32) start at
//     l * 64 B, so 8 lanes of a 16-byte access phase would hit 2 bank groups; each lane instead walks its
//     four 16-byte units in a permuted order (unit u of the registers = unit u ^ rot of the channel,
//     rot = (l >> 1) & 3; bf16 state: 2 units, rot = (l >> 2) & 1; an XOR rather than a rotation: one LOP3
//     per address). A_log, B and C are read in the same order, so the update is unchanged; only the order
//     of the C readout sum differs per lane.
//   * warps are independent (no __syncthreads): a block is 1 or 4 channel warps sharing a sequence run.
//   * session 4: with a tensor map (MixerStepParams::v3_state_map, APRIEL_STEP_V3_TMA, default on) the warp's
//     slice moves as ONE 3-D tensor copy per row and direction issued by lane 0 (the r per-lane chunk copies
//     took uniform operands, so the compiler serialized them over lanes: ~90 of ~600 warp instructions per row);
//     the box lands in the same dense layout, so the readers' XOR order stays conflict free. On the same
//     mbarrier, one more bulk copy brings the warp's conv-cache rows (w channels x S entries, contiguous in the
//     compact cache; APRIEL_STEP_V3_CONV_STAGE, default on): they then arrive kStages-1 rows ahead like the state
//     instead of a register prefetch one row ahead (a cold DRAM read queued behind the state traffic, on every
//     row's critical path; the fence.proxy.async before each row's store compiles to MEMBAR.ALL.CTA, which may
//     also wait for that load: not verified on the GPU).
// The host picks sequences per warp: at most 8, in the fewest full waves of resident warps (launch_state: b64 one wave
// of 4 rows, b256 two waves of 8); APRIEL_STEP_V3_SEQ overrides (1..32).
// PDL (APRIEL_STEP_PDL=1) as in v2: parameters are read before griddepcontrol.wait.
#pragma once
#include <type_traits>

#include "step_kernel_v2.cuh"  // v2 helpers: pdl_wait / pdl_launch_dependents; v1 helpers (StateIO, Packed16, ...)

namespace apriel {
namespace step {
namespace v3 {

constexpr int kWarp = 32;
constexpr int kWin = 4;              // sliding conv window in registers (as v2)
constexpr int kStages = 4;           // state stages per warp (default; APRIEL_STEP_V3_STAGES=8 doubles the ring)
constexpr int kMaxStages = 8;        // ring depths: 4 or 8 (powers of two: stage = row & (stages - 1))
constexpr int kMaxSeqPerWarp = 32;   // slot indices of a warp's run: one register per lane
constexpr int kMaxAutoRows = 2 * kStages;  // the launcher's cap on rows per warp (see launch_state)
constexpr int kBarBytes = 128;       // per-warp mbarrier area (kStages x 8 B), keeps the stages 128-B aligned
constexpr int kConvStageBytes = 256; // per stage: the warp's conv-cache rows when staged (w <= 32 channels x S <= 4 x 2 B)

// Shared-memory geometry of one channel's state and the rotation that makes the 16-byte accesses of a
// warp conflict free (see the header comment).
template <typename state_t>
struct Layout {
  static constexpr int kChannelBytes = 16 * static_cast<int>(sizeof(state_t));  // 64 (fp32) or 32 (bf16)
  static constexpr int kUnits = kChannelBytes / 16;                             // 16-byte units per channel
  static constexpr int kUnitStates = 16 / kUnits;                               // states per unit
  static constexpr int kStageBytes = kWarp * kChannelBytes;                     // one warp's slice of a slot
  static constexpr int kABytes = kWarp * 64;  // the warp's -exp(A_log) log2(e) rows (fp32), read once per row
  // Shared memory of one warp with a ring of `stages` (4 or 8) states. The 4-deep ring also has room for the conv
  // rows of every stage (APRIEL_STEP_V3_CONV_STAGE; 1 KB per warp: still 4 blocks per SM); the 8-deep ring does not
  // stage them (its 72.5 KB per fp32 block would drop from 3 to 2 blocks per SM).
  __host__ __device__ static constexpr int warp_smem(int stages) {
    return kBarBytes + stages * kStageBytes + kABytes + (stages == kStages ? kStages * kConvStageBytes : 0);
  }
  __device__ __forceinline__ static int rot(int lane) { return kUnits == 4 ? (lane >> 1) & 3 : (lane >> 2) & 1; }
};

// ---- sm_90 async-proxy primitives (PTX ISA 8.0: mbarrier with tx-count, cp.async.bulk).
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n\t.reg .pred P1;\n"
      "V3_WAIT:\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n\t"
      "@P1 bra V3_DONE;\n\t"
      "bra V3_WAIT;\n"
      "V3_DONE:\n\t}" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
// global -> shared, completion counted in bytes on `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}
// shared -> global, tracked by bulk async-groups of the issuing thread.
__device__ __forceinline__ void bulk_store(void* dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_addr(src)), "r"(bytes)
               : "memory");
}
// 3-D TMA tensor copies of one warp's state slice (the map: MixerStepParams::v3_state_map, built by step_api.cpp).
// `map` is the generic address of the map inside the __grid_constant__ kernel parameters.
__device__ __forceinline__ void tensor_load_3d(void* dst, const void* map, int c0, int c1, int c2, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::
          "r"(smem_addr(dst)),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void tensor_store_3d(const void* map, int c0, int c1, int c2, const void* src) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group [%0, {%1, %2, %3}], [%4];" ::"l"(map), "r"(c0),
               "r"(c1), "r"(c2), "r"(smem_addr(src))
               : "memory");
}
// Pulls the map into the TMA unit's descriptor cache ahead of the first copy (it does not depend on the previous
// kernel, so it runs before griddepcontrol.wait).
__device__ __forceinline__ void prefetch_tensor_map(const void* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(map) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// All but the newest group have finished READING shared memory (their stage may be refilled).
__device__ __forceinline__ void bulk_wait_read_all_but_newest() { asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory"); }
// Every group has finished reading shared memory: before the thread exits (the global writes complete
// before the grid does, as with CUTLASS's TMA-store epilogues, which also wait for .read only).
__device__ __forceinline__ void bulk_wait_read_all() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }

// The thread's 16 states <-> its stage slot, unit u of the registers = unit u ^ rot in memory (the slot is
// 32/64-byte aligned, so the unit address is one LOP3 off the slot address).
template <typename state_t>
struct SmemState;

template <>
struct SmemState<float> {
  __device__ __forceinline__ static void load(const unsigned char* buf, int rot, float h[16]) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float4 v = *reinterpret_cast<const float4*>(buf + ((u ^ rot) * 16));
      h[4 * u] = v.x; h[4 * u + 1] = v.y; h[4 * u + 2] = v.z; h[4 * u + 3] = v.w;
    }
  }
  __device__ __forceinline__ static void store(unsigned char* buf, int rot, const float h[16]) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      *reinterpret_cast<float4*>(buf + ((u ^ rot) * 16)) = make_float4(h[4 * u], h[4 * u + 1], h[4 * u + 2], h[4 * u + 3]);
    }
  }
};

template <>
struct SmemState<__nv_bfloat16> {
  __device__ __forceinline__ static void load(const unsigned char* buf, int rot, float h[16]) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const uint4 v = *reinterpret_cast<const uint4*>(buf + ((u ^ rot) * 16));
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {  // bf16 -> fp32 is a 16-bit shift
        h[8 * u + 2 * k] = __uint_as_float(w[k] << 16);
        h[8 * u + 2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
      }
    }
  }
  __device__ __forceinline__ static void store(unsigned char* buf, int rot, const float h[16]) {  // round to nearest even
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(h[8 * u + 2 * k], h[8 * u + 2 * k + 1]);
        w[k] = *reinterpret_cast<const uint32_t*>(&v);
      }
      *reinterpret_cast<uint4*>(buf + ((u ^ rot) * 16)) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
};

// The thread's 16 states -> its channel in the global cache (APRIEL_STEP_V3_DIRECT_STORE), in the same rotated unit
// order as the shared-memory stage (unit u of the registers = unit u ^ rot of the channel): SmemState's stores go
// through a generic pointer, so the same code emits global stores here.
template <typename state_t>
__device__ __forceinline__ void store_state_global(char* ch, int rot, const float h[16]) {
  SmemState<state_t>::store(reinterpret_cast<unsigned char*>(ch), rot, h);
}

// 16 consecutive 16-bit activations (a B or C group) in the thread's rotated state order, kept raw
// (8 registers); unit u holds elements (u ^ rot) * E .. + E - 1.
template <typename act_t, int kUnits>
struct RotIn {
  static_assert(sizeof(act_t) == 2, "v3 runs 16-bit activations only");
  static constexpr int kE = 16 / kUnits;  // elements per unit: 4 (fp32 state) or 8 (bf16 state)
  uint32_t w[8];
  // p 16-byte aligned (vec_inputs): one 8- or 16-byte load per unit.
  __device__ __forceinline__ void load_vec(const act_t* __restrict__ p, int rot) {
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const int pu = u ^ rot;
      if constexpr (kE == 4) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(p + pu * kE));
        w[2 * u] = v.x; w[2 * u + 1] = v.y;
      } else {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(p + pu * kE));
        w[4 * u] = v.x; w[4 * u + 1] = v.y; w[4 * u + 2] = v.z; w[4 * u + 3] = v.w;
      }
    }
  }
  // p 32-byte aligned (the fast row loop): unit u sits at p + ((u ^ rot) * E) = (p | rot * 2E) ^ 2E u bytes, i.e.
  // one LOP3 on the low address word per unit instead of a 64-bit add of a per-lane offset.
  __device__ __forceinline__ void load_vec32(const act_t* __restrict__ p, int rot) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(p) | static_cast<uintptr_t>(rot * kE * 2);
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const uintptr_t a = base ^ static_cast<uintptr_t>(u * kE * 2);
      if constexpr (kE == 4) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(a));
        w[2 * u] = v.x; w[2 * u + 1] = v.y;
      } else {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(a));
        w[4 * u] = v.x; w[4 * u + 1] = v.y; w[4 * u + 2] = v.z; w[4 * u + 3] = v.w;
      }
    }
  }
  __device__ __forceinline__ void load_elem(const act_t* __restrict__ p, int rot) {
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      const int pu = (n / kE) ^ rot;
      reinterpret_cast<act_t*>(w)[n] = p[pu * kE + n % kE];
    }
  }
  __device__ __forceinline__ float operator()(int n) const { return to_f(reinterpret_cast<const act_t*>(w)[n]); }
};

// One sequence's inputs for one channel, as loaded.
template <typename act_t, int kUnits>
struct TokenIn {
  RotIn<act_t, kUnits> b, c;
  Packed16<act_t> dt;
  act_t z, x;
};

template <typename act_t, typename state_t>
__global__ void __launch_bounds__(128, 4) mixer_step_v3_kernel(const __grid_constant__ MixerStepParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // the host selects v3 on sm_90+ only
#else
  using L = Layout<state_t>;
  constexpr float kLog2e = 1.4426950408889634f;
  const int D = p.d_inner, X = p.d_xb;
  // r = D / X is a power of two dividing 16: shifts instead of runtime integer divisions.
  const int log2r = __clz(X) - __clz(D);
  const int r = 1 << log2r;
  const int log2w = 5 - log2r;
  const int w = 1 << log2w;  // source channels per warp
  const int lane = threadIdx.x;
  const int cw = blockIdx.x * blockDim.y + threadIdx.y;  // channel warp
  if (cw * w >= X) return;                               // whole warp past the channels (no block barrier anywhere)
  const int row0 = blockIdx.y * p.v3_seq_per_warp;
  const int nseq = min(p.v3_seq_per_warp, p.batch - row0);  // >= 1 by the grid; warp-uniform
  const int j = lane >> log2w, i = lane & (w - 1);
  const int xs = cw * w + i;
  const bool valid = xs < X;  // r = 1 with X % 32 = 16: the upper half-warp idles
  const int g = xs >> 4, n_in = xs & (kDState - 1);
  const int c = g * kDState * r + j * kDState + n_in;
  const bool compact_conv = p.conv_state_channels == X;
  const bool writer = valid && (!compact_conv || j == 0);
  const int own_row = compact_conv ? xs : c;
  const int rot = L::rot(lane);
  // The warp's slice of a slot: r chunks (one per repeat j) of nvalid channels; chunk j's first channel
  // is chunk_c0 + 16 j and it lands at lane j * w of the stage (lane l's state at l * kChannelBytes).
  const int x0 = cw * w;
  const int nvalid = min(w, X - x0);
  const int chunk_c0 = ((x0 >> 4) << (4 + log2r)) + (x0 & (kDState - 1));  // (x0 / 16) * 16 r + x0 % 16
  const uint32_t chunk_bytes = static_cast<uint32_t>(nvalid * L::kChannelBytes);
  const act_t* __restrict__ zxbc = static_cast<const act_t*>(p.zxbc);
  const act_t* __restrict__ dt_low = static_cast<const act_t*>(p.dt_low);
  act_t* __restrict__ y = static_cast<act_t*>(p.y);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Ring depth (4 or 8, warp-uniform): 8 doubles the rows in flight per warp for DRAM-latency-bound batches
  // (hot b64 13 us vs cold 20.7 us on the H100), at 3 instead of 4 resident blocks per SM for fp32 state.
  const int nst = p.v3_stages == 8 ? 8 : kStages;
  const int log2nst = nst == 8 ? 3 : 2;
  unsigned char* wsm = smem_raw + threadIdx.y * L::warp_smem(nst);
  uint64_t* bars = reinterpret_cast<uint64_t*>(wsm);
  unsigned char* stages = wsm + kBarBytes;
  // This lane's A row in shared memory, in the fp32 state layout (conflict-free 16-byte units): keeping the
  // 16 values in registers across the row loop pushed the kernel over its 128-register cap.
  unsigned char* a_mine = stages + nst * L::kStageBytes + lane * 64;
  const int rot_a = Layout<float>::rot(lane);
  // Conv rows of the 4-deep ring's stages (APRIEL_STEP_V3_CONV_STAGE): after the A rows.
  unsigned char* conv_stages = stages + nst * L::kStageBytes + L::kABytes;
  const int S = p.conv_state_len;

  // Slot of the warp's k-th row in lane k (-1 = padding or out of range: no state I/O, y = 0). It heads the
  // critical path (slot -> state copy -> wait -> math -> store), so without PDL it is requested before the
  // parameters; with PDL it must wait for griddepcontrol.wait (the previous kernel may write slot_idx).
  int slot_lane = -1;
  auto load_slot = [&] {
    if (lane < nseq) {
      const int rr = row0 + lane;
      const int sl = p.slot_idx != nullptr ? __ldg(p.slot_idx + rr) : rr;
      slot_lane = sl < 0 || sl >= p.num_slots ? -1 : sl;
    }
  };
  if (!p.pdl) load_slot();

  // ---- layer parameters, once per warp (as v2: raw loads, arithmetic after the state loads are issued).
  // A_log in the thread's rotated state order (register unit u = unit u ^ rot of the row),
  // read straight from memory in that order (a register-side rotation becomes a local-memory array).
  float A2r[kDState];
  constexpr int kVecPerUnit = L::kUnitStates / 4;  // float4s of A_log per state unit
  if (p.vec_A && valid) {
    const float4* pa = reinterpret_cast<const float4*>(static_cast<const float*>(p.A_log) + c * p.A_log_stride0);
#pragma unroll
    for (int u = 0; u < L::kUnits; ++u) {
      const int pu = u ^ rot;
#pragma unroll
      for (int v = 0; v < kVecPerUnit; ++v) {
        const float4 a = __ldg(pa + pu * kVecPerUnit + v);
        float* d = A2r + u * L::kUnitStates + 4 * v;
        d[0] = a.x; d[1] = a.y; d[2] = a.z; d[3] = a.w;
      }
    }
  } else {
#pragma unroll
    for (int n = 0; n < kDState; ++n) {
      const int pn = ((n / L::kUnitStates) ^ rot) * L::kUnitStates + n % L::kUnitStates;
      A2r[n] = valid ? load_any(p.A_log, p.A_log_dtype, c * p.A_log_stride0 + pn * p.A_log_stride1) : 0.f;
    }
  }
  float dtw[kRegRanks];
  float w4[kWin];  // conv taps right-aligned: w4[4 - W + k] = w[k]
  float conv_b = 0.f, dt_bias = 0.f, d_skip = 0.f;
  const int conv_ch = p.repeat_kv_before_conv ? c : xs;
  const bool dtw_packed = v2::load_channel_params(p, c, conv_ch, valid, dtw, w4, conv_b, dt_bias, d_skip);
  // The TMA path: one tensor copy per row and direction, issued by lane 0 (host-checked: whole channel warps).
  const bool tma = p.v3_tma;
  if (tma && lane == 0) prefetch_tensor_map(p.v3_state_map);

  // Everything below may read what the previous kernel wrote.
  v2::pdl_wait();
  v2::pdl_launch_dependents();

  if (p.pdl) load_slot();
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < kMaxStages; ++s) {
      if (s < nst) mbar_init(bars + s);
    }
    fence_proxy_async();  // the inits are visible to the async proxy (the TMA) before its first complete_tx
  }
  __syncwarp();

  char* const ssm_base = static_cast<char*>(p.ssm_state);
  const int64_t slot_bytes = p.ssm_slot_stride * static_cast<int64_t>(sizeof(state_t));
  // Lane j < r copies chunk j (repeat j) of the warp's slice, in both directions, from 32-bit per-lane
  // offsets computed once (the bulk-copy instruction takes uniform operands, so the compiler still issues
  // the r copies one lane at a time, but without the lane-0 loop's per-chunk 64-bit address math).
  const bool chunk_lane = lane < r;
  const int chunk_smem = lane * w * L::kChannelBytes;                             // within a stage
  const int chunk_gl = (chunk_c0 + lane * kDState) * L::kChannelBytes;  // within a slot (< D * 64 B)
  // Tensor-map coordinates of the warp's box (map: dims {256 = 16 channels x 16 states, D / 16 blocks, slots},
  // box {16 min(w, 16), 32 / min(w, 16), 1}): element (x0 % 16) * 16 of block (x0 / 16) * r. The box lands
  // dense in shared memory, chunk after chunk, i.e. lane l's 64 B at l * 64 B: the layout of the per-lane
  // copies, so the XOR unit order of the readers stays conflict free (no TMA swizzle needed).
  const int tc0 = (x0 & (kDState - 1)) * kDState;
  const int tc1 = (x0 >> 4) << log2r;
  // The row loop's fast instantiation (see run_rows below) and, within it, the conv rows staged by the TMA
  // (APRIEL_STEP_V3_CONV_STAGE: the host sets v3_conv_stage only with the tensor map, a compact 16-bit conv cache
  // whose rows are contiguous (channel stride S) with 16-byte aligned warp slices, and the 4-deep ring).
  const bool fast = p.vec_inputs && p.vec_dt && p.dt_rank == kRegRanks && S <= kWin && p.conv_pos_stride == 1 &&
                    p.conv_state_dtype == (std::is_same<act_t, __half>::value ? kFloat16 : kBFloat16) &&
                    ((reinterpret_cast<uintptr_t>(p.zxbc) | static_cast<uintptr_t>(p.zxbc_batch_stride * 2)) & 31) == 0 &&
                    (X & (w - 1)) == 0;
  const bool conv_staged = fast && tma && p.v3_conv_stage && nst == kStages;
  // APRIEL_STEP_V3_DIRECT_STORE: the updated state goes from registers straight to the global cache (4 / 2
  // 16-byte stores per lane) instead of shared memory + a TMA store: no fence.proxy.async (a MEMBAR.ALL.CTA) and
  // no bulk-group wait per row, and a stage is refilled once read; costs L1 wavefronts (64-byte lane stride).
  const bool direct = p.v3_direct_store;
  // The warp's w conv rows of a slot: w * S contiguous 16-bit entries, 16-byte aligned (host-checked).
  const uint32_t conv_bytes = static_cast<uint32_t>(w * S * 2);
  const int64_t conv_slot_bytes = p.conv_slot_stride * 2;
  const char* const conv_warp = static_cast<const char*>(p.conv_state) + int64_t(x0) * S * 2;
  // State of row k -> stage k % nst (all lanes; slot warp-uniform). A padding row just arrives, so
  // every stage's phase advances once per row and the waiting parity is (k / nst) & 1 for every k.
  // The __syncwarp orders lane 0's arrive.expect_tx before the other lanes' copies (and even a copy
  // completing first could not complete the phase: lane 0's arrival would still be pending).
  // use_tma / use_conv: `tma` / `conv_staged`, passed as constants where the row loop knows them (kConvStaged).
  auto issue_load = [&](int k, int slot, bool use_tma, bool use_conv) {
    uint64_t* bar = bars + (k & (nst - 1));
    if (slot < 0) {
      if (lane == 0) mbar_arrive(bar);
      return;
    }
    if (use_tma) {  // one copy of the whole box by lane 0 (32 channels: X % w == 0 on this path)
      if (lane == 0) {
        mbar_arrive_expect_tx(bar, static_cast<uint32_t>(L::kStageBytes) + (use_conv ? conv_bytes : 0u));
        tensor_load_3d(stages + (k & (nst - 1)) * L::kStageBytes, p.v3_state_map, tc0, tc1, slot, bar);
        // The conv rows ride on the same barrier: they arrive kStages-1 rows ahead like the state, instead of
        // a register prefetch one row ahead (a cold DRAM read behind the state traffic, on every row's path).
        if (use_conv) {
          bulk_load(conv_stages + (k & (nst - 1)) * kConvStageBytes, conv_warp + slot * conv_slot_bytes, conv_bytes, bar);
        }
      }
      return;
    }
    if (lane == 0) mbar_arrive_expect_tx(bar, chunk_bytes * static_cast<uint32_t>(r));
    __syncwarp();
    if (chunk_lane) {
      bulk_load(stages + (k & (nst - 1)) * L::kStageBytes + chunk_smem, ssm_base + slot * slot_bytes + chunk_gl,
                chunk_bytes, bar);
    }
  };
  static_assert((kStages & (kStages - 1)) == 0 && kMaxStages == 2 * kStages, "stage index by mask");
  static_assert(kMaxStages * 8 <= kBarBytes, "mbarriers of the deepest ring");
#pragma unroll
  for (int k = 0; k < kMaxStages; ++k) {
    if (k < nst && k < nseq) issue_load(k, __shfl_sync(0xffffffffu, slot_lane, k), tma, conv_staged);
  }

  // ---- arithmetic on the parameters (their loads were issued long ago): -exp(A_log) log2(e), dt_proj
  // words unpacked.
#pragma unroll
  // The same MUFU form as v2 (which recomputes it per row): v2 and v3 keep bit-identical states.
  for (int n = 0; n < kDState; ++n) A2r[n] = -::apriel::ex2(A2r[n] * kLog2e) * kLog2e;
  SmemState<float>::store(a_mine, rot_a, A2r);  // read back by the same lane only: no barrier
  if (dtw_packed) {  // descending k: word k/2 <= k is read before dtw[k] overwrites it
    const bool bf16 = p.dt_proj_weight_dtype == kBFloat16;
#pragma unroll
    for (int k = kRegRanks - 1; k >= 0; --k) {
      const uint32_t word = __float_as_uint(dtw[k / 2]);
      const uint16_t bits = (k & 1) ? static_cast<uint16_t>(word >> 16) : static_cast<uint16_t>(word & 0xffffu);
      dtw[k] = bf16 ? __uint_as_float(static_cast<uint32_t>(bits) << 16) : __half2float(__ushort_as_half(bits));
    }
  }

  const int b_off = D + X + g * kDState;
  const int c_off = D + 2 * X + (c & ~(kDState - 1));
  // The row loop, instantiated three times: kFast = the configuration of a real decode call (32-byte aligned
  // input rows, dt_rank 16, a conv cache of the activation dtype with unit position stride and S <= 4),
  // where every per-row check of those properties is a compile-time constant, with the conv rows read from
  // the stage (kConvStaged) or register-prefetched one row ahead; any other call runs the general loop
  // (runtime dtype dispatch, element loads, long conv rows).
  auto run_rows = [&](auto fast_tag, auto conv_staged_tag) {
    constexpr bool kFast = decltype(fast_tag)::value;
    constexpr bool kConvStaged = decltype(conv_staged_tag)::value;  // implies kFast, the tensor map, compact conv
    static_assert(kFast || !kConvStaged, "conv rows are staged in the fast loop only");
    // kFast also requires whole warps of channels (X a multiple of w): every lane is valid, so the lane
    // predicates below are compile-time constants there.
    const bool ok = kFast || valid;
    const bool wr = kFast ? (!compact_conv || j == 0) : writer;
    // Register prefetch of row k's inputs (loads only), in two parts so that no input is double-buffered:
    // z, x, dt_low and the conv row are used by the scalar work at the top of the row and are refilled for
    // the next row right after it; B and C are used by the state update and refilled right after it.
    TokenIn<act_t, L::kUnits> tin{};
    float crow_n[kWin];
    auto prefetch_bc = [&](int k, int slot) {
      if (ok && slot >= 0) {
        const act_t* __restrict__ zr = zxbc + (row0 + k) * p.zxbc_batch_stride;
        if constexpr (kFast) {  // B / C groups start at multiples of 16 elements of a 32-byte aligned row
          tin.b.load_vec32(zr + b_off, rot);
          tin.c.load_vec32(zr + c_off, rot);
        } else if (p.vec_inputs) {
          tin.b.load_vec(zr + b_off, rot);
          tin.c.load_vec(zr + c_off, rot);
        } else {
          tin.b.load_elem(zr + b_off, rot);
          tin.c.load_elem(zr + c_off, rot);
        }
      }
    };
    auto prefetch = [&](int k, int slot) {
      const int rr = row0 + k;
      if (ok && slot >= 0) {
        const act_t* __restrict__ zr = zxbc + rr * p.zxbc_batch_stride;
        const act_t* __restrict__ dr = dt_low + rr * p.dt_batch_stride;
        if (kFast || p.vec_dt) {
          tin.dt.load(dr);
        } else {
#pragma unroll
          for (int k2 = 0; k2 < kRegRanks; ++k2) reinterpret_cast<act_t*>(tin.dt.v)[k2] = k2 < p.dt_rank ? dr[k2] : from_f<act_t>(0.f);
        }
        tin.z = zr[c];
        tin.x = zr[D + xs];
      }
      if constexpr (kConvStaged) {
        return;  // the conv rows come with the state (issue_load)
      }
      if (wr && slot >= 0) {
        const int64_t off = int64_t(slot) * p.conv_slot_stride + own_row * p.conv_channel_stride;
        if constexpr (kFast) {
          conv_tail_load_t<act_t>(p.conv_state, off, 1, S, crow_n);
        } else {
          conv_tail_load(p, off, crow_n);
        }
      } else {
#pragma unroll
        for (int k2 = 0; k2 < kWin; ++k2) crow_n[k2] = 0.f;
      }
    };
    // Conv window (the shifted row of the repeat-0 lane i, shuffled), silu(conv + bias); shifts x_new into the
    // writer's row (crow becomes the row to store).
    auto conv_silu = [&](float (&crow)[kWin], float x_new) {
      float win[kWin - 1];
#pragma unroll
      for (int k2 = 0; k2 < kWin - 1; ++k2) {
        const float v = __shfl_sync(0xffffffffu, crow[k2 + 1], i);
        win[k2] = k2 >= kWin - p.width ? v : 0.f;
      }
      const float pre = conv_b + w4[0] * win[0] + w4[1] * win[1] + w4[2] * win[2] + w4[3] * x_new;
#pragma unroll
      for (int k2 = 0; k2 < kWin - 1; ++k2) crow[k2] = crow[k2 + 1];
      crow[kWin - 1] = x_new;
      return silu_f(pre);
    };
    int s_next = __shfl_sync(0xffffffffu, slot_lane, 0);
    prefetch(0, s_next);
    prefetch_bc(0, s_next);

    for (int k = 0; k < nseq; ++k) {
      const int sk = s_next;
      const int rr = row0 + k;
      // Scalar work of row k first (its inputs arrived during the previous row); then the next row's
      // scalar inputs are requested, and its B and C once this row's update has consumed tin.b / tin.c.
      // With staged conv rows (kConvStaged) the conv part waits for the stage: it is done after mbar_wait.
      float crow[kWin];
      float u = 0.f;
      const float x_new = to_f(tin.x);
      if constexpr (!kConvStaged) {
#pragma unroll
        for (int k2 = 0; k2 < kWin; ++k2) crow[k2] = crow_n[k2];
        u = conv_silu(crow, x_new);
      }
      float dt = 0.f;
#pragma unroll
      for (int k2 = 0; k2 < kRegRanks; ++k2) dt += dtw[k2] * tin.dt(k2);
      if constexpr (!kFast) {
        for (int k2 = kRegRanks; k2 < p.dt_rank; ++k2) {  // R > 16 only: re-read
          dt += load_any(p.dt_proj_weight, p.dt_proj_weight_dtype, c * p.dt_proj_weight_stride0 + k2 * p.dt_proj_weight_stride1) *
                to_f(dt_low[rr * p.dt_batch_stride + k2]);
        }
      }
      const float dv = (dt + dt_bias) + dt_bias;
      const float delta = dv > 20.f ? dv : log1pf(expf(dv));  // precise: delta scales every state update
      const float gate = silu_f(to_f(tin.z));

      if (k + 1 < nseq) {
        s_next = __shfl_sync(0xffffffffu, slot_lane, k + 1);
        prefetch(k + 1, s_next);
      }

      const int st = k & (nst - 1);
      mbar_wait(bars + st, (static_cast<uint32_t>(k) >> log2nst) & 1u);
      act_t* y_row = y + rr * p.y_batch_stride + c;
      if (sk < 0) {
        if (ok) *y_row = from_f<act_t>(0.f);
      } else {
        unsigned char* mine = stages + st * L::kStageBytes + lane * L::kChannelBytes;
        if constexpr (kConvStaged) {  // the writer lane of each source channel reads its row from the stage
          if (wr) {
            conv_tail_load_t<act_t>(conv_stages + st * kConvStageBytes, int64_t(i) * S, 1, S, crow);
          } else {
#pragma unroll
            for (int k2 = 0; k2 < kWin; ++k2) crow[k2] = 0.f;
          }
          u = conv_silu(crow, x_new);  // warp-uniform branch: every lane takes part in the shuffles
        }
        if (ok) {
          float h[kDState], a2[kDState];
          SmemState<float>::load(a_mine, rot_a, a2);
          SmemState<state_t>::load(mine, rot, h);
          const float yp = ssm_update(h, a2, 1, delta, delta * u, tin.b, tin.c);
          *y_row = from_f<act_t>(__fmaf_rn(d_skip, u, yp) * gate);
          if (direct) {
            store_state_global<state_t>(ssm_base + sk * slot_bytes + c * L::kChannelBytes, rot, h);
          } else {
            SmemState<state_t>::store(mine, rot, h);
          }
          if (wr) {
            const int64_t base = int64_t(sk) * p.conv_slot_stride + own_row * p.conv_channel_stride;
            if constexpr (kFast) {
              conv_tail_store_t<act_t>(p.conv_state, base, 1, S, crow);
            } else if (S <= kWin && p.conv_state_dtype != kFloat64) {
              conv_tail_store(p, base, crow);
            } else {  // long rows or an fp64 cache: ascending bit copies, new x re-read (as v2, q = 1)
              for (int sp = 0; sp < S; ++sp) {
                const int src = sp + 1;
                if (src < S) {
                  copy_any(p.conv_state, p.conv_state_dtype, base + sp * p.conv_pos_stride, base + src * p.conv_pos_stride);
                } else {
                  store_any(p.conv_state, p.conv_state_dtype, base + sp * p.conv_pos_stride,
                            to_f(zxbc[rr * p.zxbc_batch_stride + D + xs]));
                }
              }
            }
          }
        }
        if (!direct) {
          fence_proxy_async();  // this thread's generic-proxy writes of the stage -> visible to the TMA store
          __syncwarp();
          if (kConvStaged || tma) {
            if (lane == 0) tensor_store_3d(p.v3_state_map, tc0, tc1, sk, stages + st * L::kStageBytes);
          } else if (chunk_lane) {
            bulk_store(ssm_base + sk * slot_bytes + chunk_gl, stages + st * L::kStageBytes + chunk_smem, chunk_bytes);
          }
        }
      }
      if (direct) {  // no store reads the stage: refill it with row k + nst as soon as every lane is done with it
        if (k + 1 < nseq) prefetch_bc(k + 1, s_next);
        __syncwarp();  // every lane has consumed stage st and passed its wait (its next phase may start)
        const int m = k + nst;
        if (m < nseq) issue_load(m, __shfl_sync(0xffffffffu, slot_lane, m), kConvStaged || tma, kConvStaged);
        continue;
      }
      // One bulk group per row and lane (empty for padding rows and lanes >= r; with the tensor map every lane
      // but 0), so "all but the newest" = every row before this one. Chunk j of the stage of row k-1 is refilled
      // now by lane j (tensor map: the whole stage by lane 0), once that lane's own store of it has read it
      // (bulk groups are per thread): ~kStages-1 rows in flight.
      if (k + 1 < nseq) prefetch_bc(k + 1, s_next);
      const int m = k - 1 + nst;
      bulk_commit();
      if (k >= 1 && m < nseq) {
        bulk_wait_read_all_but_newest();
        issue_load(m, __shfl_sync(0xffffffffu, slot_lane, m), kConvStaged || tma, kConvStaged);
      }
    }
  };
  if (!fast) {
    run_rows(std::false_type{}, std::false_type{});
  } else if (conv_staged) {
    run_rows(std::true_type{}, std::true_type{});
  } else {
    run_rows(std::true_type{}, std::false_type{});
  }
  bulk_wait_read_all();  // the stages stay allocated until the stores have read them
#endif
}

template <typename act_t, typename state_t>
void launch_state(MixerStepParams p, cudaStream_t stream) {
  using L = Layout<state_t>;
  const auto kernel = mixer_step_v3_kernel<act_t, state_t>;
  const int r = p.d_inner / p.d_xb;
  const int w = kWarp / r;
  const int src_warps = (p.d_xb + w - 1) / w;
  const int nst = p.v3_stages == 8 ? 8 : kStages;
  // Resident 4-warp blocks per SM (registers / shared memory) for each ring depth, queried once per
  // instantiation; the 8-stage ring needs more than the default 48 KB of dynamic shared memory per block (the
  // attribute is raised only when that ring is first used, so the default launches are as before).
  int bps = 1;
  if (nst == 8) {
    static const int b8 = [&] {
      APRIEL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 4 * L::warp_smem(kMaxStages)));
      int n = 0;
      APRIEL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, 4 * kWarp, 4 * L::warp_smem(kMaxStages)));
      return n > 0 ? n : 1;
    }();
    bps = b8;
  } else {
    static const int b4 = [&] {
      int n = 0;
      APRIEL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, 4 * kWarp, 4 * L::warp_smem(kStages)));
      return n > 0 ? n : 1;
    }();
    bps = b4;
  }
  int dev = 0, sms = 0;
  APRIEL_CUDA_CHECK(cudaGetDevice(&dev));
  APRIEL_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  int spw = p.v3_seq_per_warp;  // > 0: forced (benchmark sweeps)
  if (spw <= 0) {
    // Rows per warp: at most kMaxAutoRows, in the fewest FULL waves of resident warps. One wave when that needs
    // <= kMaxAutoRows rows per warp (b64: 4); otherwise n = ceil(one-wave rows / kMaxAutoRows) waves of
    // ceil(items / (n x resident)) rows (b256: 2 waves of 8, not 1 of 16). Why: a warp's last kStages-1 rows are
    // computed with no load in flight; in a single wave all warps reach that tail together and DRAM idles on the
    // loads side, while with several waves finishing blocks are replaced by new ones whose loads overlap the tail.
    // Each wave repeats the per-warp prologue (parameters, -exp(A_log)), so few rows per warp lose (b64: 2 rows in
    // 2 waves 17.82 us vs 4 rows in 1 wave 17.18). H100, fp32 state, PDL, bench/results/s4/step_full_run2.json:
    // b256 with 4 / 8 / 16 / 32 rows per warp = 62.55 / 58.52 / 59.22 / 64.96 us.
    // fp32 state only: bf16 state moves half the bytes and is bound by the per-row instruction chain, so the
    // prologue each extra wave repeats costs more than the overlapped tail gains (b256 bf16, 2 waves of 8 rows:
    // 40.41 us vs 37.78 for 1 wave of 16: bench/results/s4/run3_step_bench.txt vs step_full_run2.json).
    const int64_t cap = std::is_same<state_t, float>::value ? kMaxAutoRows : kMaxSeqPerWarp;
    const int64_t items = int64_t(src_warps) * p.batch;
    const int64_t resident = int64_t(sms) * bps * 4;
    const int64_t one_wave = (items + resident - 1) / resident;
    const int64_t waves = (one_wave + cap - 1) / cap;
    spw = static_cast<int>((items + waves * resident - 1) / (waves * resident));
  }
  spw = spw < 1 ? 1 : spw > kMaxSeqPerWarp ? kMaxSeqPerWarp : spw;
  p.v3_seq_per_warp = spw;
  // One row per warp (small batches): 1-warp blocks spread the channel warps over all SMs.
  const int wpb = spw == 1 ? 1 : (src_warps < 4 ? src_warps : 4);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((src_warps + wpb - 1) / wpb, (p.batch + spw - 1) / spw);
  cfg.blockDim = dim3(kWarp, wpb);
  cfg.dynamicSmemBytes = wpb * L::warp_smem(nst);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = p.pdl ? 1 : 0;
  APRIEL_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
}

template <typename act_t>
void launch(const MixerStepParams& p, bool ssm_state_bf16, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (ssm_state_bf16) {
    launch_state<act_t, __nv_bfloat16>(p, s);
  } else {
    launch_state<act_t, float>(p, s);
  }
}

}  // namespace v3
}  // namespace step
}  // namespace apriel
