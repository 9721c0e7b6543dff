"""Loading the compiled extension apriel_kernels._C, and reporting what is available.

Import never fails for a missing extension: a CUDA tensor reaching an op without its kernel fails at
call time with the command that fixes it. APRIEL_KERNELS_ALLOW_REFERENCE=1 runs the pure-PyTorch
reference on the GPU instead (slow; for debugging and for machines without nvcc).
"""
from __future__ import annotations

import functools
import os

import torch

BUILD_COMMAND = (
    "pip install --no-build-isolation -e .  (in the apriel-kernels checkout, with a CUDA toolkit on the PATH "
    "or CUDA_HOME set; APRIEL_KERNELS_REQUIRE_CUDA=1 shows build errors)"
)


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when apriel_kernels._C loaded, else why it did not."""
    try:
        from . import _C  # noqa: F401  (loading registers the torch.ops.apriel_C ops)
    except Exception as error:  # noqa: BLE001 - a broken or missing .so must not break import
        return f"{type(error).__name__}: {error}"
    return None


def extension_loaded() -> bool:
    return load_error() is None


def has_kernel(op_name: str) -> bool:
    """True when the extension registered torch.ops.apriel_C.<op_name>."""
    if not extension_loaded():
        return False
    try:
        getattr(torch.ops.apriel_C, op_name)
    except (AttributeError, RuntimeError):
        return False
    return True


def allow_reference_on_gpu() -> bool:
    return os.environ.get("APRIEL_KERNELS_ALLOW_REFERENCE", "") not in ("", "0")


def cuda_kernel(op_name: str):
    """The compiled op for a CUDA tensor, or None when the reference may stand in; raises otherwise."""
    if has_kernel(op_name):
        return getattr(torch.ops.apriel_C, op_name)
    if allow_reference_on_gpu():
        return None
    reason = load_error() or f"the extension was built without the {op_name!r} kernel"
    raise RuntimeError(
        f"apriel_kernels: no CUDA kernel for {op_name} ({reason}). Build it with: {BUILD_COMMAND}. "
        "Or set APRIEL_KERNELS_ALLOW_REFERENCE=1 to run the slow reference on the GPU."
    )


def _introspection(name: str):
    """apriel_kernels._C.<name> (the pybind11 introspection functions), or None with the reason."""
    if not extension_loaded():
        return None, f"extension not loaded ({load_error()})"
    from . import _C

    fn = getattr(_C, name, None)
    if fn is None:
        return None, f"the extension has no {name}() (built before introspection existed: rebuild it)"
    return fn, None


def build_info() -> dict:
    """How the extension was built and what CUDA it finds: {"available", "reason", "archs",
    "cuda_compiled", "cuda_runtime", "cuda_driver", "host_compiler", "registered_kernels", "tma_staging"
    (built with CUTLASS's headers: the scan kernels can stage tiles by TMA on sm_90)}.
    Never raises: without the extension "available" is False and "reason" says why."""
    fn, reason = _introspection("build_info")
    if fn is None:
        return {"available": False, "reason": reason}
    return {"available": True, "reason": None, **fn()}


def kernel_report(device: int | None = None) -> dict:
    """Per registered CUDA kernel (families opt in: csrc/common/kernel_registry.h), from
    cudaFuncGetAttributes and the occupancy API on `device` (default: the current one):

        {"available": bool, "reason": str | None, "device", "sm", "sm_count", "max_threads_per_sm",
         "kernels": [{"family", "name", "block_threads", "num_regs", "local_bytes" (spills),
                      "static_smem_bytes", "const_bytes", "max_threads_per_block", "binary_version",
                      "ptx_version", "blocks_per_sm", "warps_per_sm", "occupancy"} | {..., "error"}]}

    Never raises: without the extension or without a GPU "available" is False, "reason" says why and the
    kernels (if the extension loaded) carry only their names and an "error"."""
    if device is not None and (not isinstance(device, int) or isinstance(device, bool) or device < 0):
        raise ValueError(f"device: expected None or a CUDA device index >= 0, got {device!r}")
    fn, reason = _introspection("kernel_report")
    if fn is None:
        return {"available": False, "reason": reason, "kernels": []}
    report = fn(-1 if device is None else device)
    return {"available": report.get("error") is None, "reason": report.get("error"), **report}


def _kernel_summary(report: dict) -> list[dict]:
    """The compact per-kernel line that info() and the bench metadata carry."""
    keep = ("family", "name", "num_regs", "local_bytes", "static_smem_bytes", "blocks_per_sm", "occupancy", "error")
    return [{k: kernel[k] for k in keep if k in kernel} for kernel in report.get("kernels", [])]


def info(kernels: bool = False) -> dict:
    """What this installation can do: extension, its kernels, the CUDA device and its SM version, and the
    build (archs, CUDA versions). kernels=True adds the per-kernel register/spill/occupancy summary."""
    ops = []
    if extension_loaded():
        for name in ("causal_conv1d_fwd", "causal_conv1d_bwd", "causal_conv1d_update", "selective_scan_fwd",
                     "selective_scan_bwd", "mixer_scan_fwd", "mixer_scan_bwd", "mixer_step"):
            if has_kernel(name):
                ops.append(name)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else None
    sm = "sm_%d%d" % torch.cuda.get_device_capability(0) if cuda else None
    return {
        "extension_built": extension_loaded(),
        "extension_error": load_error(),
        "cuda_kernels": ops,
        "cuda_available": cuda,
        "device": device,
        "sm": sm,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "build": build_info(),
        **({"kernel_report": _kernel_summary(kernel_report())} if kernels else {}),
    }
