// fp32 instantiations of the mixer scan kernels (K = lanes per channel: 8 -> 2 states per thread, 16 -> 1).
#include "mixer_scan_bwd.cuh"
#include "mixer_scan_fwd.cuh"

namespace apriel {
template void launch_mixer_scan_fwd<float, 8>(const MixerScanParams&, void*);
template void launch_mixer_scan_fwd<float, 16>(const MixerScanParams&, void*);
template void launch_mixer_scan_fwd<float, 17>(const MixerScanParams&, void*);
template void launch_mixer_scan_bwd<float, 8>(const MixerScanParams&, void*);
template void launch_mixer_scan_bwd<float, 16>(const MixerScanParams&, void*);
template void launch_mixer_scan_bwd<float, 17>(const MixerScanParams&, void*);
}  // namespace apriel
