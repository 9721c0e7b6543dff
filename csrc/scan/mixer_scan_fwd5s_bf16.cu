// bf16 instantiations of the v5 mixer scan forward writing sub-chunk checkpoints too (mixer_scan_fwd4.cuh kSubCk,
// session 31: APRIEL_SCAN_CKPT=sub at batch 1-3, with and without documents). Own TU so that no TU's compile time
// grows.
#define APRIEL_TMA_TU 1  // this TU instantiates TMA kernels: tma.cuh includes CUTLASS (see there)
#define APRIEL_SCAN_V5_SUB_TU 1
#include "../common/kernel_registry.h"
#include "mixer_scan_fwd4.cuh"

namespace apriel {
template bool launch_mixer_scan_fwd5_sub<__nv_bfloat16, 4>(const MixerScanParams&, void*);
template bool launch_mixer_scan_fwd5_sub<__nv_bfloat16, 8>(const MixerScanParams&, void*);

namespace {
const bool kRegistered = [] {
  register_kernel({"scan", "mixer_scan_fwd5_sub<bf16,K4>", reinterpret_cast<const void*>(&scan4::mixer_scan_fwd4_kernel<__nv_bfloat16, 4, 16, false, true, 5, false, true>), 64});
  register_kernel({"scan", "mixer_scan_fwd5_sub_docs<bf16,K4>", reinterpret_cast<const void*>(&scan4::mixer_scan_fwd4_kernel<__nv_bfloat16, 4, 16, true, true, 5, false, true>), 64});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_fwd5_sub_tma<bf16,K8>", reinterpret_cast<const void*>(&scan4::mixer_scan_fwd4_kernel<__nv_bfloat16, 8, 16, false, true, 5, true, true>), 128});
  register_kernel({"scan", "mixer_scan_fwd5_sub_docs_tma<bf16,K8>", reinterpret_cast<const void*>(&scan4::mixer_scan_fwd4_kernel<__nv_bfloat16, 8, 16, true, true, 5, true, true>), 128});
#endif
  return true;
}();
}  // namespace
}  // namespace apriel
