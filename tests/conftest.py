"""Shared test plumbing: GPU tests skip (never pass) without a CUDA device and the built kernels."""
from __future__ import annotations

import pytest
import torch


def cuda_kernel_available(op_name: str) -> bool:
    from apriel_kernels._ext import has_kernel

    return torch.cuda.is_available() and has_kernel(op_name)


def require_cuda_kernel(op_name: str):
    """pytest.mark.skipif for tests that need torch.ops.apriel_C.<op_name> on a CUDA device."""
    reason = f"needs a CUDA device and the built apriel_C.{op_name} kernel"
    return pytest.mark.skipif(not cuda_kernel_available(op_name), reason=reason)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU test: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
