"""GPU timing primitives shared by every benchmark: medians with p20/p80 from device events.

    time_ms(fn, warmup_ms=25, rep_ms=100) -> {"p20": .., "p50": .., "p80": ..}   (eager launches)
    time_graph_ms(fn, ...) -> same, timing replays of a CUDA graph of fn (for launch-bound decode work)
Both use triton.testing.do_bench when Triton is importable (events, cache flush between reps), else a
local event loop with the same statistics.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

QUANTILES = (0.2, 0.5, 0.8)


def _stats(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return {"p20": q[0], "p50": q[1], "p80": q[2]}


def _event_loop(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> dict[str, float]:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(10, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _stats([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> dict[str, float]:
    """p20/p50/p80 milliseconds of fn() on the current CUDA stream."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _event_loop(fn, warmup_ms, rep_ms)
    q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return {"p20": q[0], "p50": q[1], "p80": q[2]}


def time_graph_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100, per_graph: int = 20) -> dict[str, float]:
    """Per-call p20/p50/p80 ms of fn replayed from a CUDA graph of `per_graph` back-to-back calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    stats = _event_loop(graph.replay, warmup_ms, rep_ms)
    return {k: v / per_graph for k, v in stats.items()}


def measure_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy ceiling in bytes/s, counting bytes read + written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))["p50"]
    return 2 * nbytes / (ms * 1e-3)


def measure_bf16_gemm_flops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b)["p50"]
    return 2 * n**3 / (ms * 1e-3)
