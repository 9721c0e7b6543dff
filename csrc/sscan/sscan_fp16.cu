// fp16 instantiations of the generic selective scan kernels (one forward, one backward).
#include "sscan_bwd.cuh"

namespace apriel {
template void launch_sscan_fwd<__half>(const SScanParams&, void*);
template void launch_sscan_bwd<__half>(const SScanParams&, void*);
}  // namespace apriel
