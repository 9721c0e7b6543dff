// bf16 instantiation of the v7 mixer scan backward with heads_per_group % 4 != 0 (mixer_scan_bwd7.cuh kSpan:
// blocks of 4 consecutive heads across group boundaries; session 20). Own TU so that no TU's compile time grows.
#define APRIEL_TMA_TU 1  // this TU instantiates TMA kernels: tma.cuh includes CUTLASS (see there)
#define APRIEL_SCAN_BWD7_SPAN_TU 1
#include "../common/kernel_registry.h"
#include "mixer_scan_bwd7.cuh"

namespace apriel {
template void launch_mixer_scan_bwd7_span<__nv_bfloat16>(const MixerScanParams&, void*);

namespace {
const bool kRegistered = [] {
  register_kernel({"scan", "mixer_scan_bwd7_span<bf16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__nv_bfloat16, false, false, true>), scan7b::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_bwd7_span_tma<bf16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__nv_bfloat16, true, false, true>), scan7b::kThreads});
#endif
  register_kernel({"scan", "mixer_scan_bwd7_span_docs<bf16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__nv_bfloat16, false, true, true>), scan7b::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_bwd7_span_docs_tma<bf16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__nv_bfloat16, true, true, true>), scan7b::kThreads});
#endif
  return true;
}();
}  // namespace
}  // namespace apriel
