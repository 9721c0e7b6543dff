// bf16 instantiations of the mixer scan kernels (K = lanes per channel: 8 -> 2 states per thread, 16 -> 1).
#include "mixer_scan_bwd.cuh"
#include "mixer_scan_fwd.cuh"

namespace apriel {
template void launch_mixer_scan_fwd<__nv_bfloat16, 8>(const MixerScanParams&, void*);
template void launch_mixer_scan_fwd<__nv_bfloat16, 16>(const MixerScanParams&, void*);
template void launch_mixer_scan_fwd<__nv_bfloat16, 17>(const MixerScanParams&, void*);
template void launch_mixer_scan_bwd<__nv_bfloat16, 8>(const MixerScanParams&, void*);
template void launch_mixer_scan_bwd<__nv_bfloat16, 16>(const MixerScanParams&, void*);
template void launch_mixer_scan_bwd<__nv_bfloat16, 17>(const MixerScanParams&, void*);
}  // namespace apriel
