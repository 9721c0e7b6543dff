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


def info() -> dict:
    """What this installation can do: extension, its kernels, the CUDA device and its SM version."""
    kernels = []
    if extension_loaded():
        for name in ("causal_conv1d_fwd", "causal_conv1d_bwd", "causal_conv1d_update", "selective_scan_fwd",
                     "selective_scan_bwd", "mixer_scan_fwd", "mixer_scan_bwd", "mixer_step"):
            if has_kernel(name):
                kernels.append(name)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else None
    sm = "sm_%d%d" % torch.cuda.get_device_capability(0) if cuda else None
    return {
        "extension_built": extension_loaded(),
        "extension_error": load_error(),
        "cuda_kernels": kernels,
        "cuda_available": cuda,
        "device": device,
        "sm": sm,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
