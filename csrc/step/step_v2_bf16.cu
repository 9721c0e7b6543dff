// Instantiations of the fused decode step v2 for bf16 activations (fp32 and bf16 SSM state, 1/2/4 sequences
// per thread). Kernel and thread mapping: step_kernel_v2.cuh.
#include "step_kernel_v2.cuh"

namespace apriel {
namespace step {

void launch_mixer_step_v2_bf16(const MixerStepParams& p, bool ssm_state_bf16, void* stream) {
  v2::launch<__nv_bfloat16>(p, ssm_state_bf16, stream);
}

}  // namespace step
}  // namespace apriel
