"""apriel-kernels: fused ops for attention + Mamba hybrids (Apriel-H1 mixer), with pure-PyTorch references.

Ops (torch.library custom ops under torch.ops.apriel; CPU = reference, CUDA = hand-written kernels):
- causal_conv1d_fn / causal_conv1d_update        (causal-conv1d compatible)
- selective_scan / selective_scan_fn             (mamba-ssm compatible)
- mixer_scan / mixer_step                        (the fused Apriel-H1 mixer core, prefill and decode)
- decode_attention                               (one-token GQA attention over a KV cache, split-K Triton)
`apriel_kernels.info()` reports the built extension, its kernels, the build and the CUDA device;
`apriel_kernels.kernel_report()` the registers, spills and occupancy of each registered CUDA kernel.
"""
from ._ext import build_info, info, kernel_report
from .conv1d import causal_conv1d_fn, causal_conv1d_update
from .decode_attention import decode_attention
from .mixer_scan import mixer_scan
from .mixer_step import mixer_step
from .selective_scan import selective_scan, selective_scan_fn

__all__ = [
    "build_info",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "decode_attention",
    "info",
    "kernel_report",
    "mixer_scan",
    "mixer_step",
    "selective_scan",
    "selective_scan_fn",
]
__version__ = "0.1.0"
