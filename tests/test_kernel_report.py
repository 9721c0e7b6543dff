"""Build/kernel introspection (apriel_kernels.build_info / kernel_report / info, the pybind11 part of
apriel_kernels._C): clean degradation without the extension and without a GPU, real figures on a GPU."""
from __future__ import annotations

import types

import pytest
import torch
from conftest import require_cuda_kernel

import apriel_kernels
from apriel_kernels import _ext

KERNEL_FIGURES = ("num_regs", "local_bytes", "static_smem_bytes", "max_threads_per_block", "blocks_per_sm",
                  "warps_per_sm", "occupancy")


def _hide_extension(monkeypatch, reason="ImportError: no module named apriel_kernels._C (test)"):
    monkeypatch.setattr(_ext, "extension_loaded", lambda: False)
    monkeypatch.setattr(_ext, "load_error", lambda: reason)


# ============================================================================================ CPU tests
def test_reports_without_the_extension(monkeypatch):
    _hide_extension(monkeypatch)
    report = apriel_kernels.kernel_report()
    assert report["available"] is False and report["kernels"] == []
    assert "no module named apriel_kernels._C (test)" in report["reason"]
    build = apriel_kernels.build_info()
    assert build["available"] is False and "extension not loaded" in build["reason"]
    info = apriel_kernels.info(kernels=True)
    assert info["build"]["available"] is False and info["kernel_report"] == []


def test_reports_with_an_extension_built_before_introspection(monkeypatch):
    """An old _C (plain CPython module, no build_info/kernel_report): a reason that says to rebuild."""
    old = types.ModuleType("apriel_kernels._C")
    monkeypatch.setattr(_ext, "extension_loaded", lambda: True)
    monkeypatch.setitem(__import__("sys").modules, "apriel_kernels._C", old)
    monkeypatch.setattr(apriel_kernels, "_C", old, raising=False)
    report = apriel_kernels.kernel_report()
    assert report["available"] is False and report["kernels"] == []
    assert "kernel_report" in report["reason"] and "rebuild" in report["reason"]
    assert "rebuild" in apriel_kernels.build_info()["reason"]


@pytest.mark.parametrize("device", [-1, 1.5, True, "cuda:0"])
def test_kernel_report_rejects_a_bad_device(device):
    with pytest.raises(ValueError, match=r"device: expected None or a CUDA device index >= 0"):
        apriel_kernels.kernel_report(device)


@pytest.mark.skipif(not _ext.extension_loaded() or torch.cuda.is_available(),
                    reason="needs the built extension on a machine without a CUDA device (CI)")
def test_real_extension_degrades_without_a_gpu():
    build = apriel_kernels.build_info()
    assert build["available"] is True
    assert build["archs"] and all(isinstance(a, str) and a[0].isdigit() for a in build["archs"])
    assert build["cuda_compiled"].count(".") == 1 and build["registered_kernels"] >= 1
    report = apriel_kernels.kernel_report()
    assert report["available"] is False and "no usable CUDA device" in report["reason"]
    assert len(report["kernels"]) == build["registered_kernels"]
    for kernel in report["kernels"]:
        assert kernel["name"] and kernel["error"] == report["reason"]
        assert not any(key in kernel for key in KERNEL_FIGURES)
    if _ext.has_kernel("causal_conv1d_fwd"):  # the conv1d family registers its kernels
        names = {k["name"] for k in report["kernels"] if k["family"] == "conv1d"}
        expected = {"fwd_stream<bf16,W4>", "fwd_async<bf16,W4>", "bwd_stream<bf16,W4>", "fwd_tile<bf16,W4,tok8,vecw>"}
        assert expected <= names, sorted(names)


# ============================================================================================ GPU tests
@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_fwd")
def test_kernel_report_on_the_gpu():
    build = apriel_kernels.build_info()
    major, minor = torch.cuda.get_device_capability()
    assert build["cuda_driver"] is not None and build["cuda_runtime"] is not None
    assert f"{major}.{minor}" in [a.rstrip("a") for a in build["archs"]], build["archs"]
    report = apriel_kernels.kernel_report()
    assert report["available"] is True, report["reason"]
    assert report["sm"] == f"sm_{major}{minor}"
    assert report["sm_count"] == torch.cuda.get_device_properties(0).multi_processor_count
    conv = {k["name"]: k for k in report["kernels"] if k["family"] == "conv1d"}
    assert len(conv) >= 11 * 4, sorted(conv)  # 11 kernels x 4 dtypes (+ the dweight reduction)
    for name, kernel in conv.items():
        assert "error" not in kernel, (name, kernel)
        assert kernel["binary_version"] == 10 * major + minor, (name, kernel)
        assert 0 < kernel["num_regs"] <= 255 and kernel["local_bytes"] >= 0, (name, kernel)
        assert kernel["max_threads_per_block"] >= kernel["block_threads"], (name, kernel)
        assert kernel["blocks_per_sm"] >= 1 and 0 < kernel["occupancy"] <= 1, (name, kernel)
    # The backward's host plans one wave of 3 blocks per SM for both vectorised kernels (their launch
    # bounds promise it); the stream forward asks the occupancy API itself.
    for name, kernel in conv.items():
        if name.startswith(("bwd_stream<", "bwd_async<", "bwd_tile<bf16", "bwd_tile<fp16", "fwd_stream<")):
            assert kernel["blocks_per_sm"] >= 3, (name, kernel)
    summary = apriel_kernels.info(kernels=True)["kernel_report"]
    assert {k["name"] for k in summary} >= set(conv)
