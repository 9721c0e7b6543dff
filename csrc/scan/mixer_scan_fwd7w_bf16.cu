// bf16 instantiation of the v7 mixer scan forward with two heads per warp (mixer_scan_fwd7.cuh kPW = 2: 8 heads per
// block, 2 blocks per SM; session 25). Own TU so that no TU's compile time grows.
#define APRIEL_TMA_TU 1  // this TU instantiates TMA kernels: tma.cuh includes CUTLASS (see there)
#define APRIEL_SCAN_V7_WIDE_TU 1
#include "../common/kernel_registry.h"
#include "mixer_scan_fwd7.cuh"

namespace apriel {
template void launch_mixer_scan_fwd7_wide<__nv_bfloat16>(const MixerScanParams&, void*);

namespace {
const bool kRegistered = [] {
  register_kernel({"scan", "mixer_scan_fwd7_wide<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, false, false, false, false, 2>), scan7::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_fwd7_wide_tma<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, true, false, false, false, 2>), scan7::kThreads});
#endif
  return true;
}();
}  // namespace
}  // namespace apriel
