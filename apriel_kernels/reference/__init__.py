"""Pure-PyTorch references: the semantics of every op, float64-capable, importable without the extension.

They are also the CPU implementation of the custom ops (apriel_kernels.ops) and the ground truth of the
tests.
"""
from .conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from .mixer import compact_conv_state, mixer_scan_ref, mixer_step_ref, split_zxbc
from .selective_scan import (
    expand_grouped_channels,
    expand_groups,
    selective_scan_ref,
    selective_scan_sequential_ref,
    softplus_ref,
)

__all__ = [
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "compact_conv_state",
    "expand_grouped_channels",
    "expand_groups",
    "mixer_scan_ref",
    "mixer_step_ref",
    "selective_scan_ref",
    "selective_scan_sequential_ref",
    "softplus_ref",
    "split_zxbc",
]
