// Instantiations of the fused decode step v3 for bf16 activations (fp32 and bf16 SSM state). Kernel,
// staging and thread mapping: step_kernel_v3.cuh.
#include "step_kernel_v3.cuh"

namespace apriel {
namespace step {

void launch_mixer_step_v3_bf16(const MixerStepParams& p, bool ssm_state_bf16, void* stream) {
  v3::launch<__nv_bfloat16>(p, ssm_state_bf16, stream);
}

}  // namespace step
}  // namespace apriel
