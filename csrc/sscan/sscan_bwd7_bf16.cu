// bf16 instantiation of the generic selective scan backward v7 (sscan_bwd7.cuh: the mixer scan's v7 backward core).
// Own translation unit: builds in parallel with the v1 / v2 kernels.
#include "../common/kernel_registry.h"
#include "sscan_bwd7.cuh"

namespace apriel {
template void launch_sscan_bwd7<__nv_bfloat16>(const SScanParams&, void*);

namespace {
// the default kernels (fast staging, the MUFU prep) in apriel_kernels.kernel_report()
const bool kRegistered = [] {
  register_kernel({"sscan", "sscan_bwd7<bf16,channel-major>",
                   reinterpret_cast<const void*>(&sscan7b::sscan_bwd7_kernel<__nv_bfloat16, true, true>),
                   sscan7b::kThreads});
  register_kernel({"sscan", "sscan_bwd7<bf16,token-major>",
                   reinterpret_cast<const void*>(&sscan7b::sscan_bwd7_kernel<__nv_bfloat16, false, true>),
                   sscan7b::kThreads});
  register_kernel({"sscan", "sscan_bwd7_carry<bf16,channel-major>",
                   reinterpret_cast<const void*>(&sscan7c::sscan_bwd7_carry_kernel<__nv_bfloat16, true, true>),
                   sscan7c::kThr});
  register_kernel({"sscan", "sscan_bwd7_carry<bf16,token-major>",
                   reinterpret_cast<const void*>(&sscan7c::sscan_bwd7_carry_kernel<__nv_bfloat16, false, true>),
                   sscan7c::kThr});
  return true;
}();
}  // namespace
}  // namespace apriel
