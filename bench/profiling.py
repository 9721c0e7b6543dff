"""Opt-in, scoped profiling: NVTX ranges per phase, cudaProfilerApi start/stop around the measured region,
an nsys re-run, and a torch.profiler chrome-trace fallback.

- nvtx(name): NVTX range (shown by nsys), e.g. "mixers/prefill/L=16384/b=1/sdpa-flash", "decode/step".
  Costs ~1 us per push/pop, so ranges wrap whole measurements; per-layer ranges (layer_range) are only
  emitted with --nvtx-layers, because they run inside timed code.
- measured_region(): cudaProfilerStart/Stop around the suites, so
  `nsys profile --capture-range=cudaProfilerApi` captures exactly the measurement and not the build,
  imports or ceiling measurement.
- nsys_command(argv, out_dir): the command that re-runs this suite under nsys (None without nsys).
- torch_trace(fn, path): the fallback - a few calls of fn under torch.profiler, exported as chrome trace.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

_LAYER_RANGES = {"on": False}


def set_layer_ranges(on: bool) -> None:
    _LAYER_RANGES["on"] = bool(on)


def layer_ranges_enabled() -> bool:
    return _LAYER_RANGES["on"]


@contextlib.contextmanager
def nvtx(name: str) -> Iterator[None]:
    pushed = False
    if torch.cuda.is_available():
        try:
            torch.cuda.nvtx.range_push(name)
            pushed = True
        except Exception:  # noqa: BLE001 - a torch build without NVTX still benchmarks
            pushed = False
    try:
        yield
    finally:
        if pushed:
            torch.cuda.nvtx.range_pop()


def layer_range(name: str):
    """An NVTX range for one layer when --nvtx-layers is on, else a free no-op context."""
    return nvtx(name) if _LAYER_RANGES["on"] else contextlib.nullcontext()


@contextlib.contextmanager
def measured_region() -> Iterator[None]:
    """cudaProfilerStart/Stop around the measurement (harmless when no profiler is attached)."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    try:
        yield
    finally:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def nsys_available() -> bool:
    return shutil.which("nsys") is not None


def nsys_command(argv: list[str], out_dir: str | os.PathLike) -> list[str] | None:
    """`nsys profile --capture-range=cudaProfilerApi ... python -m bench <argv without --nsys>`."""
    if not nsys_available():
        return None
    # in one process: nsys captures the cudaProfilerApi range of that process
    child = [a for a in argv if a != "--nsys"] + (["--in-process"] if "--in-process" not in argv else [])
    report = str(Path(out_dir) / "bench_nsys")
    return ["nsys", "profile", "--capture-range=cudaProfilerApi", "--capture-range-end=stop", "--trace=cuda,nvtx",
            "--force-overwrite=true", "-o", report, sys.executable, "-m", "bench", *child]


def torch_trace(fn: Callable[[], object], path: str | os.PathLike, calls: int = 3) -> Path:
    """Chrome trace of `calls` calls of fn (after one warm-up) - the fallback when nsys is absent."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return path
