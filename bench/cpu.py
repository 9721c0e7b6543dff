"""CPU fallback: without a CUDA device the suites run a reduced set on the reference ops, clearly labelled.

    run(suite, quick=False) -> list[dict] rows with provider "reference-cpu" and a note saying so
Tiny shapes (hidden 256, mixer D 256 X 64 N 16 R 16 W 4, 4 q / 1 kv heads of 64), a few wall-clock reps
each (time.perf_counter). These rows prove the suite, its files and plots work on any machine; they are
not performance figures for the GPU kernels. The e2e suite has no CPU fallback (a row says so).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .mixers import AttentionLayer, LayerShape, MixerLayer
from .rows import add_rates, error_row, make_row, unavailable

PROVIDER = "reference-cpu"
NOTE = "CPU fallback: pure-PyTorch reference ops at tiny shapes; not a GPU performance figure"
TINY = LayerShape(hidden=256, n_q=4, n_kv=1, head_dim=64, d_inner=256, d_xb=64, d_state=16, dt_rank=16, d_conv=4)


def time_cpu_ms(fn: Callable[[], object], reps: int = 5) -> dict[str, float]:
    """p20/p50/p80 wall-clock ms over reps calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"p20": q[0], "p50": q[1], "p80": q[2]}


def _measure(suite: str, op: str, fn: Callable[[], object], reps: int, tokens: int | None = None, **fields) -> dict[str, Any]:
    try:
        stats = time_cpu_ms(fn, reps)
    except Exception as error:  # noqa: BLE001 - one failure is a row
        return error_row(suite, op, PROVIDER, error, **fields)
    return add_rates(make_row(suite, op, PROVIDER, stats=stats, note=NOTE, device="cpu", **fields), tokens=tokens)


def kernel_rows(quick: bool = False) -> list[dict[str, Any]]:
    import apriel_kernels

    s, rows = TINY, []
    mixer = MixerLayer(s, device="cpu", dtype=torch.float32)
    reps = 3 if quick else 5
    for L in (64,) if quick else (64, 256):
        zxbc = torch.randn(1, L, s.zxbc_width)
        dt_low = torch.randn(1, L, s.dt_rank)
        dims = {"d_inner": s.d_inner, "d_xb": s.d_xb, "d_state": s.d_state}
        fields = {"batch": 1, "seqlen": L, "shape": f"b1 L{L}", "phase": "fwd"}
        rows.append(_measure("kernels", "mixer_scan_fwd", lambda z=zxbc, d=dt_low, dims=dims: apriel_kernels.mixer_scan(
            z, d, mixer.conv_w, mixer.conv_b, mixer.dt_w, mixer.dt_b, mixer.A_log, mixer.D, **dims),
            reps, tokens=L, **fields))
        x = torch.randn(1, s.d_inner, L)
        rows.append(_measure("kernels", "causal_conv1d_fwd", lambda x=x: apriel_kernels.causal_conv1d_fn(
            x, mixer.conv_w, mixer.conv_b, activation="silu"), reps, tokens=L, **fields))
    conv, ssm = mixer.new_cache(4)
    zx = torch.randn(4, s.zxbc_width)
    dl = torch.randn(4, s.dt_rank)
    rows.append(_measure("kernels", "mixer_step", lambda: apriel_kernels.mixer_step(
        zx, dl, conv, ssm, None, mixer.conv_w, mixer.conv_b, mixer.dt_w, mixer.dt_b, mixer.A_log, mixer.D,
        d_inner=s.d_inner, d_xb=s.d_xb, d_state=s.d_state), reps, tokens=4, batch=4, shape="b4", phase="decode"))
    return rows


def mixer_rows(quick: bool = False) -> list[dict[str, Any]]:
    s, rows = TINY, []
    reps = 3 if quick else 5
    attn = AttentionLayer(s, "sdpa", device="cpu", dtype=torch.float32)
    mixer = MixerLayer(s, device="cpu", dtype=torch.float32)
    for L in (64, 256) if quick else (64, 256, 1024):
        h = torch.randn(1, L, s.hidden)
        f = {"phase": "prefill", "batch": 1, "seqlen": L, "shape": f"b1 L{L}"}
        rows.append(_measure("mixers", "attention_layer", lambda h=h: attn.prefill(h), reps, tokens=L, **f))
        rows.append(_measure("mixers", "mixer_layer", lambda h=h: mixer.prefill(h), reps, tokens=L, **f))
        hd = torch.randn(1, s.hidden)
        k, v = attn.new_cache(1, L)
        conv, ssm = mixer.new_cache(1)
        f = {"phase": "decode", "batch": 1, "seqlen": L, "shape": f"b1 L{L}"}
        rows.append(_measure("mixers", "attention_layer", lambda hd=hd, k=k, v=v: attn.decode(hd, k, v), reps, tokens=1, **f))
        rows.append(_measure("mixers", "mixer_layer", lambda hd=hd, c=conv, st=ssm: mixer.decode(hd, c, st), reps,
                             tokens=1, **f))
    return rows


def run(suite: str, quick: bool = False) -> list[dict[str, Any]]:
    if suite == "kernels":
        return kernel_rows(quick)
    if suite == "mixers":
        return mixer_rows(quick)
    return [unavailable(suite, "model", PROVIDER, "no CUDA device: the e2e suite needs a GPU (no CPU fallback)")]
