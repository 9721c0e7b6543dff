"""Causal conv1d kernel benchmark: forward, forward+backward and the decode update, against the bars of
kernels.md, the measured copy ceiling and the installed peers.

    run(quick=False) -> list[dict]   long-format rows (bench/rows.py): op, provider, phase, shape, layout,
                                     p20/p50/p80_ms, gb_per_s, pct_of_copy_ceiling, bar_ms, meets_bar, ...
    python -m bench.kernels_conv1d [--out conv1d.json] [--quick]   prints a table, writes JSON

Providers: "apriel" (the public causal_conv1d_fn for fwd; the two torch.ops.apriel_C kernels back to back
for fwd+bwd, i.e. what autograd runs, without autograd's Python overhead), "apriel[tokN]" (the vectorised
forward forced to N tokens per thread via APRIEL_CONV1D_FWD_TOKENS, to check the default's choice),
"apriel[scalarw]" (the former scalar weight/bias loads, APRIEL_CONV1D_VEC_WEIGHTS=0; vector loads are the
default since they measured faster on the H100),
"apriel[fwd=tile|stream|async|deep|wide]", "apriel[bwd=tile|stream|async|deep|fused|wide]", "apriel[stream]",
"apriel[async]", "apriel[deep]", "apriel[<fwd>+<bwd>]" (fwd+bwd): the kernel variants of
APRIEL_CONV1D_FWD_IMPL / APRIEL_CONV1D_BWD_IMPL, forced explicitly so the rows do not depend on the
default; "apriel[cm=generic|vec]" (channel-major forward and backward, APRIEL_CONV1D_CM_IMPL) (the tokN / scalarw rows force the tile kernel they tune), "torch copy_" (a token-major copy of the same bytes: the practical floor at that size, launch and
ramp included), "causal-conv1d" (the peer package, only if importable), "torch" (depthwise F.conv1d + silu,
channel-major).
Bytes counted (the floor): fwd reads x and writes out; fwd+bwd adds reading x and dout and writing dx.
Times are device-event medians from bench/timing.py (triton do_bench: L2 flushed between reps).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from .rows import add_rates, environment, error_row, make_row, unavailable, write_json
from .timing import measure_copy_bandwidth, time_graph_ms, time_ms
from .variants import env_override

SUITE = "kernels"
WIDTH = 4
# (phase, batch, seqlen, dim) -> bar in ms (kernels.md, issue 2)
BARS = {("fwd", 1, 8192, 4096): 0.050, ("fwd", 1, 8192, 1024): 0.016, ("fwd+bwd", 1, 8192, 4096): 0.18}
FWD_SHAPES = [(1, 8192, 4096), (1, 8192, 1024), (8, 4096, 4096), (1, 32768, 4096)]
BWD_SHAPES = [(1, 8192, 4096), (1, 8192, 1024), (8, 4096, 4096)]
# Kernel variants (APRIEL_CONV1D_FWD_IMPL / _BWD_IMPL values; docs/notes/conv1d.md). deep: 6 cp.async
# stages; fused (bwd): deep + the dweight reduction in the same kernel (cooperative launch); wide: a
# block's 4 warps on adjacent channels of one run (fwd: async otherwise; bwd: fused otherwise).
FWD_IMPLS = ("tile", "stream", "async", "deep", "wide")
BWD_IMPLS = ("tile", "stream", "async", "deep", "fused", "wide")
FWD_BWD_PAIRS = (("stream", "stream"), ("async", "async"), ("deep", "deep"), ("async", "fused"), ("deep", "fused"),
                 ("wide", "wide"), ("async", "wide"))
UPDATE_BATCHES = [1, 16, 64, 256]


def _shape(batch: int, seqlen: int, dim: int) -> str:
    return f"b{batch} L{seqlen} C{dim}"


def _inputs(batch, seqlen, dim, dtype=torch.bfloat16, token_major=True):
    if token_major:
        x = torch.randn(batch, seqlen, dim, device="cuda", dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(batch, dim, seqlen, device="cuda", dtype=dtype)
    w = torch.randn(dim, WIDTH, device="cuda", dtype=dtype) * 0.5
    b = torch.randn(dim, device="cuda", dtype=dtype)
    return x, w, b


def _row(op, provider, phase, batch, seqlen, dim, stats, nbytes, copy_bps, layout="token-major", **extra):
    row = make_row(SUITE, op, provider, stats=stats, phase=phase, shape=_shape(batch, seqlen, dim), batch=batch,
                   seqlen=seqlen, layout=layout, dtype="bf16", width=WIDTH, bytes=int(nbytes), **extra)
    add_rates(row, nbytes=nbytes, floor_ms=nbytes / copy_bps * 1e3)
    row["pct_of_copy_ceiling"] = 100.0 * row["gb_per_s"] * 1e9 / copy_bps
    bar = BARS.get((phase, batch, seqlen, dim))
    if bar is not None and provider == "apriel":
        row["bar_ms"] = bar
        row["meets_bar"] = bool(stats["p50"] <= bar)
    return row


def _peer():
    try:
        from causal_conv1d import causal_conv1d_fn as peer_fn
    except Exception:  # noqa: BLE001 - any import failure means "not installed"
        return None
    return peer_fn


def _fwd_rows(quick, copy_bps):
    peer = _peer()
    rows = []
    for batch, seqlen, dim in FWD_SHAPES[:2] if quick else FWD_SHAPES:
        rows += _fwd_shape(batch, seqlen, dim, peer, copy_bps)
    return rows


def _fwd_shape(batch, seqlen, dim, peer, copy_bps):
    from apriel_kernels import causal_conv1d_fn

    rows = []
    x, w, b = _inputs(batch, seqlen, dim)
    xc = x.contiguous()  # channel-major copy: the generic kernel, and torch's conv1d layout
    nbytes = 2 * x.numel() * x.element_size()
    args = (batch, seqlen, dim)

    def ours():
        return causal_conv1d_fn(x, w, b, activation="silu")

    try:
        # The first timing at a new shape ran ~2x slow in two H100 runs (1024 ch: 0.049 vs 0.024 ms for the
        # same kernel measured right after); a short untimed warm-up keeps that out of the bar row.
        time_ms(ours, warmup_ms=10, rep_ms=20)
        rows.append(_row("causal_conv1d", "apriel", "fwd", *args, time_ms(ours), nbytes, copy_bps,
                         graph_p50_ms=time_graph_ms(ours)["p50"]))
        for impl in FWD_IMPLS:
            with env_override("APRIEL_CONV1D_FWD_IMPL", impl):
                rows.append(_row("causal_conv1d", f"apriel[fwd={impl}]", "fwd", *args, time_ms(ours), nbytes,
                                 copy_bps, graph_p50_ms=time_graph_ms(ours)["p50"]))
        for tokens in ("4", "8"):  # tile-kernel knobs: force the tile kernel whatever the default is
            with env_override("APRIEL_CONV1D_FWD_TOKENS", tokens), env_override("APRIEL_CONV1D_FWD_IMPL", "tile"):
                rows.append(_row("causal_conv1d", f"apriel[tok{tokens}]", "fwd", *args, time_ms(ours), nbytes,
                                 copy_bps))
        with env_override("APRIEL_CONV1D_VEC_WEIGHTS", "0"), env_override("APRIEL_CONV1D_FWD_IMPL", "tile"):
            rows.append(_row("causal_conv1d", "apriel[scalarw]", "fwd", *args, time_ms(ours), nbytes, copy_bps,
                             note="scalar weight loads (former default)"))
        stats = time_ms(lambda: causal_conv1d_fn(xc, w, b, activation="silu"))
        rows.append(_row("causal_conv1d", "apriel", "fwd", *args, stats, nbytes, copy_bps, layout="channel-major"))
        for impl in ("generic", "vec"):  # forced, so the rows do not depend on the default
            with env_override("APRIEL_CONV1D_CM_IMPL", impl):
                cm = lambda: causal_conv1d_fn(xc, w, b, activation="silu")
                rows.append(_row("causal_conv1d", f"apriel[cm={impl}]", "fwd", *args, time_ms(cm), nbytes, copy_bps,
                                 layout="channel-major", graph_p50_ms=time_graph_ms(cm)["p50"]))
    except Exception as error:  # noqa: BLE001
        rows.append(error_row(SUITE, "causal_conv1d", "apriel", error, phase="fwd", shape=_shape(*args)))
    if peer is None:
        rows.append(unavailable(SUITE, "causal_conv1d", "causal-conv1d", "causal_conv1d not importable",
                                phase="fwd", shape=_shape(*args)))
    else:
        try:
            stats = time_ms(lambda: peer(x, w, b, activation="silu"))
            rows.append(_row("causal_conv1d", "causal-conv1d", "fwd", *args, stats, nbytes, copy_bps))
        except Exception as error:  # noqa: BLE001
            rows.append(error_row(SUITE, "causal_conv1d", "causal-conv1d", error, phase="fwd", shape=_shape(*args)))
    copy_dst = torch.empty(batch, seqlen, dim, device="cuda", dtype=x.dtype)
    x_rows = x.transpose(1, 2)  # the (batch, seqlen, dim) storage of x
    copy = lambda: copy_dst.copy_(x_rows)
    rows.append(_row("causal_conv1d", "torch copy_", "fwd", *args, time_ms(copy), nbytes,
                     copy_bps, note="copy of the same bytes: practical floor at this size",
                     graph_p50_ms=time_graph_ms(copy)["p50"]))
    stats = time_ms(lambda: F.silu(F.conv1d(xc, w.unsqueeze(1), b, padding=WIDTH - 1, groups=dim)[..., :seqlen]))
    rows.append(_row("causal_conv1d", "torch", "fwd", *args, stats, nbytes, copy_bps, layout="channel-major"))
    return rows


def _bwd_rows(quick, copy_bps):
    peer = _peer()
    rows = []
    for batch, seqlen, dim in BWD_SHAPES[:1] if quick else BWD_SHAPES:
        rows += _bwd_shape(batch, seqlen, dim, peer, copy_bps)
    return rows


def _bwd_shape(batch, seqlen, dim, peer, copy_bps):
    rows = []
    x, w, b = _inputs(batch, seqlen, dim)
    dout = torch.randn(batch, seqlen, dim, device="cuda", dtype=x.dtype).transpose(1, 2)
    nbytes = 5 * x.numel() * x.element_size()
    args = (batch, seqlen, dim)
    fwd, bwd = torch.ops.apriel_C.causal_conv1d_fwd, torch.ops.apriel_C.causal_conv1d_bwd

    def step():
        fwd(x, w, b, None, None, False, True)
        bwd(x, w, b, None, None, dout, None, True)

    try:
        rows.append(_row("causal_conv1d", "apriel", "fwd+bwd", *args, time_ms(step), nbytes, copy_bps))
        stats = time_ms(lambda: bwd(x, w, b, None, None, dout, None, True))
        bwd_bytes = 3 * x.numel() * x.element_size()  # reads x and dout, writes dx
        rows.append(_row("causal_conv1d", "apriel", "bwd", *args, stats, bwd_bytes, copy_bps))
        with env_override("APRIEL_CONV1D_VEC_WEIGHTS", "0"), env_override("APRIEL_CONV1D_FWD_IMPL", "tile"), \
                env_override("APRIEL_CONV1D_BWD_IMPL", "tile"):
            rows.append(_row("causal_conv1d", "apriel[scalarw]", "fwd+bwd", *args, time_ms(step), nbytes, copy_bps,
                             note="scalar weight loads (former default)"))
        for impl in BWD_IMPLS:
            with env_override("APRIEL_CONV1D_BWD_IMPL", impl):
                stats = time_ms(lambda: bwd(x, w, b, None, None, dout, None, True))
                rows.append(_row("causal_conv1d", f"apriel[bwd={impl}]", "bwd", *args, stats, bwd_bytes, copy_bps))
        xc, doutc = x.contiguous(), dout.contiguous()  # channel-major (b, C, L): the generic or the cm=vec kernel
        for impl in ("generic", "vec"):
            with env_override("APRIEL_CONV1D_CM_IMPL", impl):
                stats = time_ms(lambda: bwd(xc, w, b, None, None, doutc, None, True))
                rows.append(_row("causal_conv1d", f"apriel[cm={impl}]", "bwd", *args, stats, bwd_bytes, copy_bps,
                                 layout="channel-major"))
        for fwd_impl, bwd_impl in FWD_BWD_PAIRS:
            name = fwd_impl if fwd_impl == bwd_impl else f"{fwd_impl}+{bwd_impl}"
            with env_override("APRIEL_CONV1D_FWD_IMPL", fwd_impl), env_override("APRIEL_CONV1D_BWD_IMPL", bwd_impl):
                rows.append(_row("causal_conv1d", f"apriel[{name}]", "fwd+bwd", *args, time_ms(step), nbytes,
                                 copy_bps, note=f"{fwd_impl} forward + {bwd_impl} backward"))
    except Exception as error:  # noqa: BLE001
        rows.append(error_row(SUITE, "causal_conv1d", "apriel", error, phase="fwd+bwd", shape=_shape(*args)))
    if peer is not None:
        xg = x.detach().requires_grad_()
        wg, bg = w.detach().requires_grad_(), b.detach().requires_grad_()

        def peer_step():
            peer(xg, wg, bg, activation="silu").backward(dout)

        try:
            rows.append(_row("causal_conv1d", "causal-conv1d", "fwd+bwd", *args, time_ms(peer_step), nbytes,
                             copy_bps, note="autograd"))
        except Exception as error:  # noqa: BLE001
            rows.append(error_row(SUITE, "causal_conv1d", "causal-conv1d", error, phase="fwd+bwd",
                                  shape=_shape(*args)))
    return rows


def _update_rows(quick, copy_bps):
    return [row for batch in (UPDATE_BATCHES[:2] if quick else UPDATE_BATCHES)
            for row in _update_batch(batch, copy_bps)]


def _update_batch(batch, copy_bps, dim=4096, dtype=torch.bfloat16):
    x = torch.randn(batch, dim, 1, device="cuda", dtype=dtype)
    state = torch.randn(batch * 2, dim, WIDTH - 1, device="cuda", dtype=torch.float32)
    idx = torch.randperm(batch * 2, device="cuda")[:batch].to(torch.int32)
    w, b = torch.randn(dim, WIDTH, device="cuda", dtype=dtype), torch.randn(dim, device="cuda", dtype=dtype)
    kernel = torch.ops.apriel_C.causal_conv1d_update
    nbytes = batch * dim * (2 * 2 + 2 * (WIDTH - 1) * 4)  # x in, out, fp32 state read + written
    try:
        stats = time_graph_ms(lambda: kernel(x, state, w, b, True, idx))
        return [_row("causal_conv1d_update", "apriel", "decode", batch, 1, dim, stats, nbytes, copy_bps,
                     note="CUDA graph replay; fp32 state, permuted slots")]
    except Exception as error:  # noqa: BLE001
        return [error_row(SUITE, "causal_conv1d_update", "apriel", error, phase="decode", shape=_shape(batch, 1, dim))]


def run(quick: bool = False) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return [unavailable(SUITE, "causal_conv1d", "apriel", "no CUDA device")]
    copy_bps = measure_copy_bandwidth()
    rows = []
    for part in (_fwd_rows, _bwd_rows, _update_rows):
        try:
            rows += part(quick, copy_bps)
        except Exception as error:  # noqa: BLE001 - one failing part must not hide the others
            rows.append(error_row(SUITE, "causal_conv1d", "apriel", error, note=f"{part.__name__} failed"))
    for row in rows:
        row["copy_ceiling_tb_s"] = copy_bps / 1e12
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'op':<21}{'phase':<8}{'provider':<19}{'layout':<14}{'shape':<18}{'p50 ms':>9}{'GB/s':>8}{'%copy':>7}  bar"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r.get('op', ''):<21}{r.get('phase', ''):<8}{r.get('provider', ''):<19}{'':<14}"
                         f"{r.get('shape', ''):<18}  {r['status']}: {r.get('note', '')}")
            continue
        bar = ""
        if "bar_ms" in r:
            bar = f"<= {r['bar_ms']:.3f} {'PASS' if r['meets_bar'] else 'MISS'}"
        lines.append(f"{r['op']:<21}{r['phase']:<8}{r['provider']:<19}{r.get('layout', ''):<14}{r['shape']:<18}"
                     f"{r['p50_ms']:>9.4f}{r['gb_per_s']:>8.0f}{r['pct_of_copy_ceiling']:>7.1f}  {bar}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="causal conv1d kernel benchmark")
    parser.add_argument("--out", default=None, help="write {meta, rows} JSON here")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick)
    env = environment()
    rows = [{**env, **r} for r in rows]
    print(format_table(rows))
    if args.out:
        from apriel_kernels import info

        # info(kernels=True): the build (archs, CUDA versions) and each registered kernel's registers,
        # spill bytes and occupancy next to the timings they explain.
        meta = {**env, "apriel_kernels": info(kernels=True),
                "copy_ceiling_tb_s": next((r["copy_ceiling_tb_s"] for r in rows if "copy_ceiling_tb_s" in r), None)}
        print(f"wrote {write_json(args.out, rows, meta)}")


if __name__ == "__main__":
    main()
