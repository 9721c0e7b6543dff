// fp32 instantiation of the v4 mixer scan backward (K = 8 lanes per channel, dt_rank staged 32 wide).
#include "../common/kernel_registry.h"
#include "mixer_scan_bwd4.cuh"

namespace apriel {
template void launch_mixer_scan_bwd4<float>(const MixerScanParams&, void*);

namespace {
// Introspection (apriel_kernels.kernel_report()).
const bool kRegistered = [] {
  register_kernel({"scan", "mixer_scan_bwd4<fp32>", reinterpret_cast<const void*>(&scan4b::mixer_scan_bwd4_kernel<float, false>), 128});
  return true;
}();
}  // namespace
}  // namespace apriel
