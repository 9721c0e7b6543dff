// fp16 instantiations of the v4 mixer scan forward (K = 4 or 8 lanes per channel; dt_rank staged 16 / 32 wide).
#include "../common/kernel_registry.h"
#include "mixer_scan_fwd4.cuh"

namespace apriel {
template void launch_mixer_scan_fwd4<__half, 4>(const MixerScanParams&, void*);
template void launch_mixer_scan_fwd4<__half, 8>(const MixerScanParams&, void*);

namespace {
// Introspection (apriel_kernels.kernel_report()): the default-path kernels (dt_rank <= 16, no seq_idx).
const bool kRegistered = [] {
  register_kernel({"scan", "mixer_scan_fwd4<fp16,K4>", reinterpret_cast<const void*>(&scan4::mixer_scan_fwd4_kernel<__half, 4, 16, false, true>), 64});
  register_kernel({"scan", "mixer_scan_fwd4<fp16,K8>", reinterpret_cast<const void*>(&scan4::mixer_scan_fwd4_kernel<__half, 8, 16, false, true>), 128});
  return true;
}();
}  // namespace
}  // namespace apriel
