// Launch-error checking for .cu files, which include CUDA headers only (no torch: keeps compiles fast).
#pragma once
#include <cuda_runtime.h>

#include <cstdio>
#include <stdexcept>
#include <string>

namespace apriel {

inline void check_cuda(cudaError_t status, const char* what, const char* file, int line) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("apriel_kernels CUDA error in ") + what + " (" + file + ":" +
                             std::to_string(line) + "): " + cudaGetErrorString(status));
  }
}

}  // namespace apriel

#define APRIEL_CUDA_CHECK(expr) ::apriel::check_cuda((expr), #expr, __FILE__, __LINE__)
#define APRIEL_CHECK_LAUNCH() ::apriel::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
