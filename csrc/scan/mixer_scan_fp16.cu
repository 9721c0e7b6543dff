// fp16 instantiations of the mixer scan kernels (K = lanes per channel: 8 -> 2 states per thread, 16 -> 1).
#include "mixer_scan_bwd.cuh"
#include "mixer_scan_fwd.cuh"

namespace apriel {
template void launch_mixer_scan_fwd<__half, 8>(const MixerScanParams&, void*);
template void launch_mixer_scan_fwd<__half, 16>(const MixerScanParams&, void*);
template void launch_mixer_scan_fwd<__half, 17>(const MixerScanParams&, void*);
template void launch_mixer_scan_bwd<__half, 8>(const MixerScanParams&, void*);
template void launch_mixer_scan_bwd<__half, 16>(const MixerScanParams&, void*);
template void launch_mixer_scan_bwd<__half, 17>(const MixerScanParams&, void*);
}  // namespace apriel
