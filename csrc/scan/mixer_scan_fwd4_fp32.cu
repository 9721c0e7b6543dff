// fp32 instantiations of the v4 mixer scan forward (K = 4 or 8 lanes per channel; dt_rank staged 16 / 32 wide).
#include "mixer_scan_fwd4.cuh"

namespace apriel {
template void launch_mixer_scan_fwd4<float, 4>(const MixerScanParams&, void*);
template void launch_mixer_scan_fwd4<float, 8>(const MixerScanParams&, void*);
}  // namespace apriel
