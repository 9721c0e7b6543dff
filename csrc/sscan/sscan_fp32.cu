// fp32 instantiations of the generic selective scan kernels (one forward, one backward).
#include "sscan_bwd.cuh"

namespace apriel {
template void launch_sscan_fwd<float>(const SScanParams&, void*);
template void launch_sscan_bwd<float>(const SScanParams&, void*);
}  // namespace apriel
