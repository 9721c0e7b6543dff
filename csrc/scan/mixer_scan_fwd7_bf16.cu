// bf16 instantiation of the v7 mixer scan forward (mixer_scan_fwd7.cuh: input product and readout on tensor cores).
// Own TU so it compiles in parallel with the other forward versions.
#define APRIEL_TMA_TU 1  // this TU instantiates TMA kernels: tma.cuh includes CUTLASS (see there)
#include "../common/kernel_registry.h"
#include "mixer_scan_fwd7.cuh"

namespace apriel {
template void launch_mixer_scan_fwd7<__nv_bfloat16>(const MixerScanParams&, void*);
template void launch_mixer_scan_fwd7_varlen<__nv_bfloat16>(const MixerScanParams&, int, void*);

namespace {
const bool kRegistered = [] {
  register_kernel({"scan", "mixer_scan_fwd7<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, false>), scan7::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_fwd7_tma<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, true>), scan7::kThreads});
#endif
  // packed documents (kSeq, session 12)
  register_kernel({"scan", "mixer_scan_fwd7_docs<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, false, true>), scan7::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_fwd7_docs_tma<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, true, true>), scan7::kThreads});
#endif
  // varlen scheduling of packed documents (kVar, session 17)
  register_kernel({"scan", "mixer_scan_fwd7_varlen<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, false, true, true>), scan7::kThreads});
#if APRIEL_TMA
  register_kernel({"scan", "mixer_scan_fwd7_varlen_tma<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, true, true, true>), scan7::kThreads});
  // sub-chunk checkpoints (kSubCk, session 30)
  register_kernel({"scan", "mixer_scan_fwd7_sub_tma<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, true, false, false, false, true>), scan7::kThreads});
  register_kernel({"scan", "mixer_scan_fwd7_varlen_sub_tma<bf16>", reinterpret_cast<const void*>(&scan7::mixer_scan_fwd7_kernel<__nv_bfloat16, true, true, true, false, true>), scan7::kThreads});  // session 31
#endif
  return true;
}();
}  // namespace
}  // namespace apriel
