// fp16 instantiation of the v7 mixer scan backward with one head per x / B group (mixer_scan_bwd7.cuh kMulti: a
// block's 4 heads are 4 whole groups; session 24). Own TU so that no TU's compile time grows.
#define APRIEL_TMA_TU 1  // this TU instantiates TMA kernels: tma.cuh includes CUTLASS (see there)
#define APRIEL_SCAN_BWD7_MULTI_TU 1
#include "../common/kernel_registry.h"
#include "mixer_scan_bwd7.cuh"

namespace apriel {
template void launch_mixer_scan_bwd7_multi<__half>(const MixerScanParams&, void*);

namespace {
const bool kRegistered = [] {
  register_kernel({"scan", "mixer_scan_bwd7_multi<fp16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__half, false, false, false, true>), scan7b::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_bwd7_multi_tma<fp16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__half, true, false, false, true>), scan7b::kThreads});
#endif
  register_kernel({"scan", "mixer_scan_bwd7_multi_docs<fp16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__half, false, true, false, true>), scan7b::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_bwd7_multi_docs_tma<fp16>", reinterpret_cast<const void*>(&scan7b::mixer_scan_bwd7_kernel<__half, true, true, false, true>), scan7b::kThreads});
#endif
  return true;
}();
}  // namespace
}  // namespace apriel
