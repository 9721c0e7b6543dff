// bf16 instantiation of the generic selective scan forward v7 (sscan_fwd7.cuh: the mixer scan's v7 scan core).
// Own translation unit: builds in parallel with the v1 / v2 kernels.
#include "../common/kernel_registry.h"
#include "sscan_fwd7.cuh"

namespace apriel {
template void launch_sscan_fwd7<__nv_bfloat16>(const SScanParams&, void*);

namespace {
// the default kernels (fast staging, the MUFU prep) in apriel_kernels.kernel_report()
const bool kRegistered = [] {
  register_kernel({"sscan", "sscan_fwd7<bf16,channel-major>",
                   reinterpret_cast<const void*>(&sscan7::sscan_fwd7_kernel<__nv_bfloat16, true, true, true>),
                   sscan7::kThreads});
  register_kernel({"sscan", "sscan_fwd7<bf16,token-major>",
                   reinterpret_cast<const void*>(&sscan7::sscan_fwd7_kernel<__nv_bfloat16, false, true, true>),
                   sscan7::kThreads});
  register_kernel({"sscan", "sscan_fwd7_state<bf16,channel-major>",
                   reinterpret_cast<const void*>(&sscan7p::sscan_fwd7_state_kernel<__nv_bfloat16, true, true>),
                   sscan7p::kThr});
  register_kernel({"sscan", "sscan_fwd7_state<bf16,token-major>",
                   reinterpret_cast<const void*>(&sscan7p::sscan_fwd7_state_kernel<__nv_bfloat16, false, true>),
                   sscan7p::kThr});
  return true;
}();
}  // namespace
}  // namespace apriel
