"""Package-level behaviour: import without the extension, the availability report, missing-kernel errors."""
from __future__ import annotations

import pytest
import torch

import apriel_kernels
from apriel_kernels import _ext
from apriel_kernels import _validate as V


def test_info_reports_build_and_device():
    info = apriel_kernels.info()
    for key in ("extension_built", "cuda_kernels", "cuda_available", "sm", "torch"):
        assert key in info
    assert info["cuda_available"] == torch.cuda.is_available()
    if not info["extension_built"]:
        assert info["extension_error"] and info["cuda_kernels"] == []


def test_missing_kernel_error_names_the_fix(monkeypatch):
    monkeypatch.setattr(_ext, "has_kernel", lambda name: False)
    monkeypatch.delenv("APRIEL_KERNELS_ALLOW_REFERENCE", raising=False)
    with pytest.raises(RuntimeError, match=r"mixer_step.*pip install --no-build-isolation"):
        _ext.cuda_kernel("mixer_step")
    monkeypatch.setenv("APRIEL_KERNELS_ALLOW_REFERENCE", "1")
    assert _ext.cuda_kernel("mixer_step") is None


def test_validation_messages_name_argument_and_expectation():
    sizes = V.Sizes()
    V.check_tensor("x", torch.zeros(2, 3), ("batch", "dim"), sizes=sizes)
    with pytest.raises(ValueError, match=r"weight dim 0: expected dim = 3"):
        V.check_tensor("weight", torch.zeros(4, 2), ("dim", None), sizes=sizes)
    with pytest.raises(TypeError, match=r"x: expected dtype in \(float32\), got int64"):
        V.check_tensor("x", torch.zeros(2, dtype=torch.long), (None,), (torch.float32,))
    with pytest.raises(ValueError, match=r"slot_idx: expected values in \[0, 4\) or -1"):
        V.check_index_range("slot_idx", torch.tensor([0, 4], dtype=torch.int32), 4)
    with pytest.raises(TypeError, match=r"bias: expected a tensor, got None"):
        V.check_tensor("bias", None)
