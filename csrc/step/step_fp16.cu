// Instantiations of the fused decode step for fp16 activations (fp32 and bf16 SSM state, 1/2/4 sequences
// per block). Kernel and thread mapping: step_kernel.cuh.
#include "step_kernel.cuh"

namespace apriel {
namespace step {

void launch_mixer_step_fp16(const MixerStepParams& p, bool ssm_state_bf16, void* stream) {
  launch_mixer_step<__half>(p, ssm_state_bf16, stream);
}

}  // namespace step
}  // namespace apriel
