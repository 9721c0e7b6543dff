// fp16 instantiation of the generic selective scan forward v7 (sscan_fwd7.cuh: the mixer scan's v7 scan core).
// Own translation unit: builds in parallel with the v1 / v2 kernels.
#include "sscan_fwd7.cuh"

namespace apriel {
template void launch_sscan_fwd7<__half>(const SScanParams&, void*);
}  // namespace apriel
