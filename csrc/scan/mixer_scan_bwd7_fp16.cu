// fp16 instantiation of the v7 mixer scan backward (mixer_scan_bwd7.cuh: the adjoint in the forward v7's tensor-core
// layout). Own TU so it compiles in parallel with the other scan kernels.
#define APRIEL_TMA_TU 1  // this TU instantiates TMA kernels: tma.cuh includes CUTLASS (see there)
#include "../common/kernel_registry.h"
#include "mixer_scan_bwd7.cuh"

namespace apriel {
template void launch_mixer_scan_bwd7<__half>(const MixerScanParams&, void*);
template void launch_mixer_scan_bwd7_carry<__half>(const MixerScanParams&, void*);

namespace {
const bool kRegistered = [] {
  register_kernel({"scan", "mixer_scan_bwd7<fp16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__half, false>), scan7b::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_bwd7_tma<fp16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__half, true>), scan7b::kThreads});
#endif
  register_kernel({"scan", "mixer_scan_bwd7_carry<fp16>", reinterpret_cast<const void*>(&scan7c::mixer_scan_bwd7_carry_kernel<__half>), scan7c::kThr});
  // packed documents (kSeq, session 13)
  register_kernel({"scan", "mixer_scan_bwd7_docs<fp16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__half, false, true>), scan7b::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_bwd7_docs_tma<fp16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__half, true, true>), scan7b::kThreads});
#endif
  register_kernel({"scan", "mixer_scan_bwd7_carry_docs<fp16>", reinterpret_cast<const void*>(&scan7c::mixer_scan_bwd7_carry_kernel<__half, true>), scan7c::kThr});
#if APRIEL_TMA
  // sub-chunk checkpoints loaded instead of pass A (kSubCk, session 30)
  register_kernel({"scan", "mixer_scan_bwd7_sub_tma<fp16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__half, true, false, false, false, true>), scan7b::kThreads});
#endif
  return true;
}();
}  // namespace
}  // namespace apriel
