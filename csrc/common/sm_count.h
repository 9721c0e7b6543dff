// Multiprocessors of a CUDA device, for the host-side dispatch rules (grid fill, waves). CUDA runtime only:
// ATen/cuda/CUDAContext.h would pull in cuSPARSE / cuBLAS headers that a minimal toolkit lacks.
#pragma once
#include <cuda_runtime.h>

namespace apriel {

// device: a CUDA device index, or -1 for the current one. 132 (an H100's) if the query fails; the failure is
// cleared so that it does not surface at a later CUDA call.
inline int sm_count(int device = -1) {
  int sms = 132;
  if ((device < 0 && cudaGetDevice(&device) != cudaSuccess) ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    sms = 132;
  }
  return sms;
}

}  // namespace apriel
