// Opt-in registry of __global__ functions for build/runtime introspection: csrc/module.cpp reports, for
// every registered kernel, cudaFuncGetAttributes (registers, local/spill bytes, static shared memory, max
// threads per block) and the occupancy at the launch block size (apriel_kernels.kernel_report()).
// A family registers from its .cu files (CUDA headers only, no torch) with a static registrar:
//   static const bool registered = (apriel::register_kernel({"conv1d", "fwd_stream<bf16,W4>",
//                                    reinterpret_cast<const void*>(&my_kernel<...>), 128}), true);
// Families that register nothing simply do not appear in the report.
#pragma once

namespace apriel {

struct KernelEntry {
  const char* family;   // csrc/<family>
  const char* name;     // kernel and template arguments, human-readable
  const void* func;     // the __global__ function (host stub address), as cudaFuncGetAttributes takes it
  int block_threads;    // threads per block the launcher uses (for the occupancy figure)
};

// Defined in csrc/module.cpp; safe to call from static initialisers (function-local storage).
void register_kernel(const KernelEntry& entry);

}  // namespace apriel
