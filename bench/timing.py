"""GPU timing primitives shared by every benchmark: medians with p20/p80 from device events.

    time_ms(fn, warmup_ms=25, rep_ms=100) -> {"p20": .., "p50": .., "p80": ..}   (eager launches)
    time_graph_ms(fn, ...) -> same, timing replays of a CUDA graph of fn (for launch-bound decode work)
    peak_extra_mb(fn) -> (peak MB allocated above what was allocated before one fn(), MB of the tensors it returned)
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


# --------------------------------------------------------------------------------------------------------
# Additions for the suites (bench/__main__.py): long calls, L2 flushing, rotating inputs.

_L2_FLUSH: dict[str, torch.Tensor] = {}


def flush_l2(nbytes: int = 256 << 20) -> None:
    """Overwrite a buffer larger than any L2 so the next timed call starts from HBM (what do_bench does)."""
    buf = _L2_FLUSH.get("buf")
    if buf is None or buf.numel() < nbytes:
        buf = _L2_FLUSH["buf"] = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    buf.zero_()


def time_long_ms(fn: Callable[[], object], budget_ms: float = 1500, min_reps: int = 3, max_reps: int = 50) -> dict[str, float]:
    """p20/p50/p80 ms for calls too long for do_bench's fixed 5-call estimate: one warm-up, then
    min_reps..max_reps timed calls within budget_ms, each from a flushed L2, each bracketed by events."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush_l2()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    reps = int(min(max_reps, max(min_reps, budget_ms / max(first, 1e-3))))
    times = [first]
    for _ in range(reps - 1):
        flush_l2()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return _stats(times)


def time_auto_ms(fn: Callable[[], object], long_call_ms: float = 20.0, budget_ms: float = 1500) -> dict[str, float]:
    """time_ms for short calls; time_long_ms (bounded total time) once one call exceeds long_call_ms."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    if start.elapsed_time(end) > long_call_ms:
        return time_long_ms(fn, budget_ms=budget_ms)
    return time_ms(fn)


def rotating(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable cycling through fns (each bound to its own copy of the inputs), so back-to-back calls -
    and the calls captured into a CUDA graph by time_graph_ms - never find the previous call's data in L2."""
    if not fns:
        raise ValueError("fns: expected at least one callable")
    state = {"i": 0}

    def call():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()

    return call


def peak_extra_mb(fn: Callable[[], object]) -> tuple[float, float]:
    """(Peak MiB allocated above the allocation before one call of fn - its returned tensors included -, MiB of the
    tensors fn returned: a tensor or a sequence of them). The memory figure of the kernel benchmarks' fwd+bwd rows."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    tensors = [out] if isinstance(out, torch.Tensor) else [t for t in (out or ()) if isinstance(t, torch.Tensor)]
    returned = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    del out, tensors
    return peak, returned
