// bf16 instantiations of the v5 mixer scan forward (mixer_scan_fwd4.cuh with kVer = 5: Smem5 layout, more blocks
// per SM, branch-free softplus; bitwise the same results as v4). Own TU so it compiles in parallel with v4's.
#define APRIEL_TMA_TU 1  // this TU instantiates TMA kernels: tma.cuh includes CUTLASS (see there)
#include "../common/kernel_registry.h"
#include "mixer_scan_fwd4.cuh"

namespace apriel {
template void launch_mixer_scan_fwd5<__nv_bfloat16, 4>(const MixerScanParams&, void*);
template void launch_mixer_scan_fwd5<__nv_bfloat16, 8>(const MixerScanParams&, void*);

namespace {
const bool kRegistered = [] {
  register_kernel({"scan", "mixer_scan_fwd5<bf16,K4>", reinterpret_cast<const void*>(&scan4::mixer_scan_fwd4_kernel<__nv_bfloat16, 4, 16, false, true, 5>), 64});
  register_kernel({"scan", "mixer_scan_fwd5<bf16,K8>", reinterpret_cast<const void*>(&scan4::mixer_scan_fwd4_kernel<__nv_bfloat16, 8, 16, false, true, 5>), 128});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_fwd5_tma<bf16,K8>", reinterpret_cast<const void*>(&scan4::mixer_scan_fwd4_kernel<__nv_bfloat16, 8, 16, false, true, 5, true>), 128});
  register_kernel({"scan", "mixer_scan_fwd5_docs_tma<bf16,K8>", reinterpret_cast<const void*>(&scan4::mixer_scan_fwd4_kernel<__nv_bfloat16, 8, 16, true, true, 5, true>), 128});  // packed documents (session 14)
#endif
  return true;
}();
}  // namespace
}  // namespace apriel
