// bf16 instantiation of the generic selective scan forward v2 (8 kernels: K 4 / 8, packed or not, B / C tile
// token-fast or token-major). Own translation unit: builds in parallel with the v1 kernels.
#include "sscan_fwd2.cuh"

namespace apriel {
template void launch_sscan_fwd2<__nv_bfloat16>(const SScanParams&, void*);
}  // namespace apriel
