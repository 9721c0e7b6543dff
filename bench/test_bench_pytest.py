"""pytest-benchmark entry points for the kernel microbenchmarks: `pytest bench/ --benchmark-only`.

On a GPU: the apriel-15b mixer shape (D 4096, X 1024, N 16, R 16, W 4), bf16, with a device synchronize
inside each measured call (pytest-benchmark times wall clock; `python -m bench kernels` gives the
device-event figures). A kernel missing from the built extension is skipped. On CPU: the reference ops at
tiny shapes (D 256, X 64), so the entry points run anywhere; those are not GPU figures.
"""
from __future__ import annotations

import pytest
import torch

import apriel_kernels

GPU = {"d_inner": 4096, "d_xb": 1024, "d_state": 16, "dt_rank": 16, "width": 4, "L": 8192}
TINY = {"d_inner": 256, "d_xb": 64, "d_state": 16, "dt_rank": 16, "width": 4, "L": 64}


def _need(op: str, device: str) -> None:
    if device == "cuda":
        from apriel_kernels._ext import has_kernel

        if not has_kernel(op):
            pytest.skip(f"the extension lacks the {op} kernel")


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _params(s, device, dtype):
    D, _X, N, R, W = s["d_inner"], s["d_xb"], s["d_state"], s["dt_rank"], s["width"]
    return {
        "conv_weight": torch.randn(D, W, device=device, dtype=dtype) * 0.5,
        "conv_bias": torch.randn(D, device=device, dtype=dtype) * 0.1,
        "dt_proj_weight": (torch.rand(D, R, device=device, dtype=dtype) * 2 - 1) * R**-0.5,
        "dt_proj_bias": torch.full((D,), -4.0, device=device, dtype=dtype),
        "A_log": torch.log(torch.arange(1, N + 1, device=device, dtype=torch.float32)).repeat(D, 1),
        "D": torch.ones(D, device=device, dtype=torch.float32),
    }


@pytest.fixture
def shape(device):
    return GPU if device == "cuda" else TINY


@pytest.fixture
def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def test_mixer_scan_fwd(benchmark, device, shape, dtype):
    _need("mixer_scan_fwd", device)
    s = shape
    zxbc = torch.randn(1, s["L"], 2 * s["d_inner"] + 2 * s["d_xb"], device=device, dtype=dtype)
    dt_low = torch.randn(1, s["L"], s["dt_rank"], device=device, dtype=dtype)
    p = _params(s, device, dtype)
    sync = _sync(device)

    def call():
        y = apriel_kernels.mixer_scan(zxbc, dt_low, p["conv_weight"], p["conv_bias"], p["dt_proj_weight"],
                                      p["dt_proj_bias"], p["A_log"], p["D"], d_inner=s["d_inner"], d_xb=s["d_xb"],
                                      d_state=s["d_state"])
        sync()
        return y

    y = benchmark(call)
    assert y.shape == (1, s["L"], s["d_inner"]) and torch.isfinite(y).all()


def test_mixer_step(benchmark, device, shape, dtype):
    _need("mixer_step", device)
    s, b = shape, 16
    zxbc = torch.randn(b, 2 * s["d_inner"] + 2 * s["d_xb"], device=device, dtype=dtype)
    dt_low = torch.randn(b, s["dt_rank"], device=device, dtype=dtype)
    conv_state = torch.randn(b, s["d_xb"], s["width"] - 1, device=device, dtype=dtype)
    ssm_state = torch.randn(b, s["d_inner"] // s["d_state"], s["d_state"], s["d_state"], device=device) * 0.1
    p = _params(s, device, dtype)
    sync = _sync(device)

    def call():
        y = apriel_kernels.mixer_step(zxbc, dt_low, conv_state, ssm_state, None, p["conv_weight"], p["conv_bias"],
                                      p["dt_proj_weight"], p["dt_proj_bias"], p["A_log"], p["D"], d_inner=s["d_inner"],
                                      d_xb=s["d_xb"], d_state=s["d_state"])
        sync()
        return y

    y = benchmark(call)
    assert y.shape == (b, s["d_inner"]) and torch.isfinite(y).all()


def test_causal_conv1d_fwd(benchmark, device, shape, dtype):
    _need("causal_conv1d_fwd", device)
    s = shape
    x = torch.randn(1, s["L"], s["d_inner"], device=device, dtype=dtype).transpose(1, 2)  # token-major
    w = torch.randn(s["d_inner"], s["width"], device=device, dtype=dtype) * 0.5
    bias = torch.randn(s["d_inner"], device=device, dtype=dtype)
    sync = _sync(device)

    def call():
        out = apriel_kernels.causal_conv1d_fn(x, w, bias, activation="silu")
        sync()
        return out

    out = benchmark(call)
    assert out.shape == x.shape and torch.isfinite(out).all()
