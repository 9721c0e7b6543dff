// The Python module apriel_kernels._C. Ops register themselves with TORCH_LIBRARY_FRAGMENT in each kernel
// family's host file (csrc/<family>/*_api.cpp) when this shared object loads; this file's own job (the
// pybind11 part) is build and runtime introspection, which torch ops cannot express well (dicts of mixed
// types, no tensors, must work without a GPU):
//   _C.build_info() -> dict     archs compiled, CUDA version compiled against / runtime / driver, host
//                               compiler, number of kernels in the introspection registry
//   _C.kernel_report(device=-1) -> dict   per registered kernel (csrc/common/kernel_registry.h):
//                               cudaFuncGetAttributes (registers, local = spill bytes, static shared
//                               memory, max threads per block, binary/PTX version) and the occupancy at
//                               the launcher's block size; "error" (and no figures) without a usable GPU.
// Python wrappers with fallbacks for a missing extension: apriel_kernels/_ext.py.
// Nothing here throws a C++ exception (the GPU machine's torch 2.11 build kills the process on any
// exception crossing an extension boundary; docs/notes/STATUS.md): CUDA failures become "error" strings.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "kernel_registry.h"

namespace py = pybind11;

// -DAPRIEL_KERNELS_ARCHS=8.0_9.0a from setup.py (one pp-number token, so no shell quoting is needed).
#define APRIEL_STR2(x) #x
#define APRIEL_STR(x) APRIEL_STR2(x)
#ifdef APRIEL_KERNELS_ARCHS
static const char* kArchs = APRIEL_STR(APRIEL_KERNELS_ARCHS);
#else
static const char* kArchs = "";
#endif

namespace apriel {
namespace {

std::vector<KernelEntry>& registry() {
  static std::vector<KernelEntry> entries;  // filled by static initialisers of the .cu files at load time
  return entries;
}

std::string version_string(int v) {  // CUDA's 1000 * major + 10 * minor
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

py::list split_archs() {
  py::list out;
  std::string all(kArchs), cur;
  for (char ch : all) {
    if (ch == '_') {
      if (!cur.empty()) out.append(cur);
      cur.clear();
    } else {
      cur += ch;
    }
  }
  if (!cur.empty()) out.append(cur);
  return out;
}

py::dict build_info() {
  py::dict d;
  d["archs"] = split_archs();
  d["cuda_compiled"] = version_string(CUDART_VERSION);
  int runtime = 0, driver = 0;
  d["cuda_runtime"] = cudaRuntimeGetVersion(&runtime) == cudaSuccess ? py::object(py::str(version_string(runtime)))
                                                                      : py::object(py::none());
  // 0 = no driver installed (a CPU-only machine).
  d["cuda_driver"] = cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0
                         ? py::object(py::str(version_string(driver)))
                         : py::object(py::none());
#if defined(__clang__)
  d["host_compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["host_compiler"] = "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#else
  d["host_compiler"] = "unknown";
#endif
  d["registered_kernels"] = registry().size();
  // Built with CUTLASS's headers: the scan kernels can stage tiles by TMA (csrc/common/tma.cuh) on sm_90.
#ifdef APRIEL_HAVE_CUTLASS
  d["tma_staging"] = true;
#else
  d["tma_staging"] = false;
#endif
  (void)cudaGetLastError();
  return d;
}

py::dict entry_base(const KernelEntry& e) {
  py::dict k;
  k["family"] = e.family;
  k["name"] = e.name;
  k["block_threads"] = e.block_threads;
  return k;
}

py::dict kernel_report(int device) {
  py::dict report;
  py::list kernels;
  std::string error;
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    error = std::string("no usable CUDA device: ") + (status != cudaSuccess ? cudaGetErrorString(status) : "none found");
  }
  int previous = -1;
  if (error.empty()) {
    cudaGetDevice(&previous);
    if (device < 0) device = previous;
    if (device >= count) {
      error = "device " + std::to_string(device) + " out of range (" + std::to_string(count) + " devices)";
    } else if (device != previous && (status = cudaSetDevice(device)) != cudaSuccess) {
      error = std::string("cudaSetDevice: ") + cudaGetErrorString(status);
    }
  }
  int max_threads_sm = 0, sms = 0, major = 0, minor = 0;
  if (error.empty()) {
    cudaDeviceGetAttribute(&max_threads_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    report["device"] = device;
    report["sm"] = "sm_" + std::to_string(major) + std::to_string(minor);
    report["sm_count"] = sms;
    report["max_threads_per_sm"] = max_threads_sm;
  } else {
    report["device"] = py::none();
  }
  for (const KernelEntry& e : registry()) {
    py::dict k = entry_base(e);
    if (!error.empty()) {
      k["error"] = error;
      kernels.append(k);
      continue;
    }
    cudaFuncAttributes attr;
    status = cudaFuncGetAttributes(&attr, e.func);
    if (status != cudaSuccess) {  // e.g. no binary for this device's arch in the fatbin
      k["error"] = std::string("cudaFuncGetAttributes: ") + cudaGetErrorString(status);
      (void)cudaGetLastError();
      kernels.append(k);
      continue;
    }
    k["num_regs"] = attr.numRegs;
    k["local_bytes"] = attr.localSizeBytes;  // per thread; > 0 means register spills (or local arrays)
    k["static_smem_bytes"] = attr.sharedSizeBytes;
    k["const_bytes"] = attr.constSizeBytes;
    k["max_threads_per_block"] = attr.maxThreadsPerBlock;
    k["binary_version"] = attr.binaryVersion;
    k["ptx_version"] = attr.ptxVersion;
    int blocks = 0;
    status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, e.func, e.block_threads, 0);
    if (status == cudaSuccess) {
      k["blocks_per_sm"] = blocks;
      k["warps_per_sm"] = blocks * ((e.block_threads + 31) / 32);
      k["occupancy"] = max_threads_sm > 0 ? double(blocks * e.block_threads) / max_threads_sm : 0.0;
    } else {
      k["occupancy_error"] = std::string(cudaGetErrorString(status));
      (void)cudaGetLastError();
    }
    kernels.append(k);
  }
  if (previous >= 0 && previous != device) cudaSetDevice(previous);
  (void)cudaGetLastError();
  report["error"] = error.empty() ? py::object(py::none()) : py::object(py::str(error));
  report["kernels"] = kernels;
  return report;
}

}  // namespace

void register_kernel(const KernelEntry& entry) { registry().push_back(entry); }

}  // namespace apriel

PYBIND11_MODULE(_C, m) {
  m.doc() = "apriel-kernels CUDA extension: ops under torch.ops.apriel_C, plus build/kernel introspection";
  m.def("build_info", &apriel::build_info, "archs compiled, CUDA compiled/runtime/driver versions, host compiler");
  m.def("kernel_report", &apriel::kernel_report, py::arg("device") = -1,
        "per registered kernel: registers, spill (local) bytes, static smem, max threads/block, occupancy");
}
