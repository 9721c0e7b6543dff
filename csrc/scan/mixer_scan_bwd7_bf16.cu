// bf16 instantiation of the v7 mixer scan backward (mixer_scan_bwd7.cuh: the adjoint in the forward v7's tensor-core
// layout). Own TU so it compiles in parallel with the other scan kernels.
#define APRIEL_TMA_TU 1  // this TU instantiates TMA kernels: tma.cuh includes CUTLASS (see there)
#include "../common/kernel_registry.h"
#include "mixer_scan_bwd7.cuh"

namespace apriel {
template void launch_mixer_scan_bwd7<__nv_bfloat16>(const MixerScanParams&, void*);
template void launch_mixer_scan_bwd7_carry<__nv_bfloat16>(const MixerScanParams&, void*);

namespace {
const bool kRegistered = [] {
  register_kernel({"scan", "mixer_scan_bwd7<bf16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__nv_bfloat16, false>), scan7b::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_bwd7_tma<bf16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__nv_bfloat16, true>), scan7b::kThreads});
#endif
  register_kernel({"scan", "mixer_scan_bwd7_carry<bf16>", reinterpret_cast<const void*>(&scan7c::mixer_scan_bwd7_carry_kernel<__nv_bfloat16>), scan7c::kThr});
  // packed documents (kSeq, session 13)
  register_kernel({"scan", "mixer_scan_bwd7_docs<bf16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__nv_bfloat16, false, true>), scan7b::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_bwd7_docs_tma<bf16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__nv_bfloat16, true, true>), scan7b::kThreads});
#endif
  register_kernel({"scan", "mixer_scan_bwd7_carry_docs<bf16>", reinterpret_cast<const void*>(&scan7c::mixer_scan_bwd7_carry_kernel<__nv_bfloat16, true>), scan7c::kThr});
#if APRIEL_TMA
  // sub-chunk checkpoints loaded instead of pass A (kSubCk, session 30)
  register_kernel({"scan", "mixer_scan_bwd7_sub_tma<bf16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__nv_bfloat16, true, false, false, false, true>), scan7b::kThreads});
#endif
  return true;
}();
}  // namespace
}  // namespace apriel
