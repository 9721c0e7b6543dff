"""pytest plumbing for `pytest bench/ --benchmark-only` (pytest-benchmark microbenchmarks of the kernels).

The device fixture is "cuda" when a GPU is present, else "cpu" (the reference ops at tiny shapes, so the
entry points run anywhere). Benchmarks of a kernel the extension lacks are skipped, never faked.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
