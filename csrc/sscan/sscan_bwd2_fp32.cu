// fp32 instantiation of the generic selective scan backward v2 (4 kernels: packed or not, B / C tile
// token-fast or token-major). Own translation unit: builds in parallel with the other kernels.
#include "sscan_bwd2.cuh"

namespace apriel {
template void launch_sscan_bwd2<float>(const SScanParams&, void*);
}  // namespace apriel
