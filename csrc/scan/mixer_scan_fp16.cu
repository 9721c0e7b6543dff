// fp16 instantiations of the mixer scan kernels (v3 forward and the backward, K = 16 lanes per channel:
// 1 state per thread; the K = 8 and occupancy variants measured slower and were dropped to save build time).
#include "mixer_scan_bwd.cuh"
#include "mixer_scan_fwd.cuh"

namespace apriel {
template void launch_mixer_scan_fwd<__half, 16>(const MixerScanParams&, void*);
template void launch_mixer_scan_bwd<__half, 16>(const MixerScanParams&, void*);
}  // namespace apriel
