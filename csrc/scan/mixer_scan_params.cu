// The mixer parameters the backward kernels read as fp32 (conv weight / bias, dt_proj weight / bias, A_log, D),
// converted from their own dtypes in one launch (session 22).
//
// Why: the backward kernels take const float* parameters; torch's .to(float) made one conversion kernel per
// parameter that is not already fp32 (4 launches per backward with bf16 parameters, ~3.5 us each on the H100).
// Shape contract: ParamsF32Args (scan_params.h): segment i converts n[i] contiguous elements of src[i] (a ParamDType)
// into dst[i]; blockIdx.y = segment, a grid-stride loop over its elements.
#include "../common/cuda_check.h"
#include "scan_common.cuh"

#include <cstdint>

namespace apriel {
namespace {

constexpr int kThreadsPerBlock = 256;

__global__ void __launch_bounds__(kThreadsPerBlock) mixer_scan_params_f32_kernel(ParamsF32Args a) {
  const int i = blockIdx.y;
  const int64_t n = a.n[i];
  const ParamRef src{a.src[i], a.dtype[i]};
  float* dst = a.dst[i];
  for (int64_t e = (int64_t)blockIdx.x * kThreadsPerBlock + threadIdx.x; e < n;
       e += (int64_t)gridDim.x * kThreadsPerBlock)
    dst[e] = src.dtype == kParamF64 ? static_cast<float>(static_cast<const double*>(src.ptr)[e]) : scan::ld_param(src, e);
}

}  // namespace

void launch_params_to_f32(const ParamsF32Args& a, void* stream) {
  if (a.count == 0) return;
  int64_t most = 0;
  for (int i = 0; i < a.count; ++i) most = a.n[i] > most ? a.n[i] : most;
  const int64_t blocks = (most + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const dim3 grid((unsigned)(blocks < 1 ? 1 : blocks > 128 ? 128 : blocks), (unsigned)a.count);
  mixer_scan_params_f32_kernel<<<grid, kThreadsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(a);
  APRIEL_CHECK_LAUNCH();
}

}  // namespace apriel
