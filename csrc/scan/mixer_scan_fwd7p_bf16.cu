// bf16 instantiation of the v7 mixer scan forward with heads_per_group % 4 != 0 (mixer_scan_fwd7.cuh kPartial:
// warps without a head in each group's last block; session 19; varlen scheduling: session 23). Own TU so that no
// TU's compile time grows.
#define APRIEL_TMA_TU 1  // this TU instantiates TMA kernels: tma.cuh includes CUTLASS (see there)
#define APRIEL_SCAN_V7_PARTIAL_TU 1
#include "../common/kernel_registry.h"
#include "mixer_scan_fwd7.cuh"

namespace apriel {
template void launch_mixer_scan_fwd7_partial<__nv_bfloat16>(const MixerScanParams&, void*);
template void launch_mixer_scan_fwd7_varlen_partial<__nv_bfloat16>(const MixerScanParams&, int, void*);

namespace {
const bool kRegistered = [] {
  register_kernel({"scan", "mixer_scan_fwd7_partial<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, false, false, false, true>), scan7::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_fwd7_partial_tma<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, true, false, false, true>), scan7::kThreads});
#endif
  register_kernel({"scan", "mixer_scan_fwd7_partial_docs<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, false, true, false, true>), scan7::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_fwd7_partial_docs_tma<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, true, true, false, true>), scan7::kThreads});
#endif
  // varlen scheduling of packed documents (kVar, session 23)
  register_kernel({"scan", "mixer_scan_fwd7_partial_varlen<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, false, true, true, true>), scan7::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_fwd7_partial_varlen_tma<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, true, true, true, true>), scan7::kThreads});
#endif
  return true;
}();
}  // namespace
}  // namespace apriel
