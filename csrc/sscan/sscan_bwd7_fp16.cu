// fp16 instantiation of the generic selective scan backward v7 (sscan_bwd7.cuh: the mixer scan's v7 backward core).
// Own translation unit: builds in parallel with the v1 / v2 kernels.
#include "sscan_bwd7.cuh"

namespace apriel {
template void launch_sscan_bwd7<__half>(const SScanParams&, void*);
}  // namespace apriel
