// bf16 instantiations of the mixer scan kernels (v3 forward and the backward, K = 16 lanes per channel:
// 1 state per thread; the K = 8 and occupancy variants measured slower and were dropped to save build time).
#include "mixer_scan_bwd.cuh"
#include "mixer_scan_fwd.cuh"

namespace apriel {
template void launch_mixer_scan_fwd<__nv_bfloat16, 16>(const MixerScanParams&, void*);
template void launch_mixer_scan_bwd<__nv_bfloat16, 16>(const MixerScanParams&, void*);
}  // namespace apriel
