"""Benchmark of the fused mixer scan (issue 3 bars): forward and forward+backward at the Apriel-H1 shape.

    run(quick=False) -> list[dict]      long-format rows (bench/rows.py keys)
    python -m bench.kernels_scan --out FILE [--quick]

Timed region: from the in_proj output (zxbc, dt_low) to y, everything included (conv, dt_proj, scan, gate);
fwd+bwd adds the backward to every input gradient. floor_ms is the MUFU exp2 floor of kernels.md:
65536 * b * L exponentials at 3.9e12 /s (one per (channel, state, token); the backward is held to the same
floor, which it cannot reach: it needs >= 2 exp2 per element). Providers: "apriel" is the default dispatch
(docs/scan.md "Which kernel runs": forward v5 K = 8 at b1-b2, v5 K = 4 at b3, v7 from b4; backward v7), timed
eagerly like the peers' do_bench figures;
"apriel-graph" the same call replayed from a CUDA graph (no host overhead: the kernel's own time);
"apriel-v4k4" / "apriel-v4k8" / "apriel-v3" force a forward version (APRIEL_SCAN_FWD), "apriel-bcf32" makes
v4 read fp32 copies of B / C instead of the raw 16-bit tile (APRIEL_SCAN_BC=f32), for comparison;
"apriel-v5" / "apriel-v5-graph" / "apriel-v5k4" / "apriel-v5k8" time the session-4 forward v5 at either K
(APRIEL_SCAN_FWD=v5*: v4's arithmetic with a smaller shared-memory layout, more blocks per SM and a leaner prep);
"apriel-v4" / "apriel-v4-graph" the session-3 default (v4 at either K); "apriel-v7" / "apriel-v7-graph" force the
session-5 forward v7 (APRIEL_SCAN_FWD=v7: input product and readout on tensor cores, one warp per head).
APRIEL_BENCH_SCAN_FWD_PROVIDERS=a,b,... keeps only those forward providers (shorter A/B runs).
fwd+bwd and bwd rows: "apriel" (default dispatch: backward v7, split along the sequence where the grid is small),
"apriel[ckpt=sub]" (session 30: the forward also saves the states after tokens 7, 15, 23 of every tile - where v7
runs, and since session 31 where v5 runs: every row here - and the backward loads them instead of recomputing them;
APRIEL_SCAN_CKPT=sub, 4x the checkpoint memory), "apriel[bwd=v4]" / "apriel[bwd=v7]" (forced, APRIEL_SCAN_BWD),
"apriel[bwd-bc=f32]" (v4 reading fp32 copies of B / C instead of the raw 16-bit tile, APRIEL_SCAN_BWD_BC=f32),
"apriel[bwd=v3]" (the previous backward, APRIEL_SCAN_BWD=v3, forward unchanged) and "apriel-v3" (both previous
kernels); APRIEL_BENCH_SCAN_BWD_PROVIDERS=a,b keeps only those; APRIEL_BENCH_SCAN_BWD_B4=1 adds b4 L4096.
APRIEL_BENCH_SCAN_PHASES=bwd (or fwd) restricts the run to the fwd+bwd / bwd rows (or the fwd rows): one
device call can then A/B the backward versions in ~30 s.
Packed documents (session 17; the distill module's default layout): "apriel-packed" / "apriel-packed-graph" time the
default dispatch with seq_idx (documents of 500-1,500 tokens) at b1 L8192 and b8 L4096 - at batch 1-3 a plan on the
device picks the varlen v7 forward (blocks over (channel group, document)) when the documents are short enough -
and "apriel-packed[varlen=0]" without that plan (APRIEL_SCAN_VARLEN=0: the session-16 dispatch); fwd+bwd rows
"apriel-packed" and "apriel-packed[ckpt=sub]" (session 31: the varlen plan's kernels write the sub-chunk
checkpoints too). No bar applies to them (the bars are single sequences). APRIEL_BENCH_SCAN_PACKED=0 leaves them out.
"""
from __future__ import annotations

import os
import sys

import torch

from . import rows as R
from .timing import peak_extra_mb, time_graph_ms, time_ms
from .variants import env_override

D, X, N, RANK, W = 4096, 1024, 16, 16, 4
EXP2_PER_S = 3.9e12
BARS = {("fwd", 1, 2048): 0.065, ("fwd", 1, 8192): 0.25, ("fwd", 1, 32768): 1.0, ("fwd", 8, 4096): 0.87,
        ("fwd+bwd", 1, 8192): 1.3, ("fwd+bwd", 8, 4096): 4.8}


def _inputs(batch, seqlen, requires_grad=False):
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, dtype=dt: torch.randn(*s, device=dev, dtype=dtype, generator=g)  # noqa: E731
    args = dict(
        zxbc=rnd(batch, seqlen, 2 * D + 2 * X),
        dt_low=rnd(batch, seqlen, RANK) * 0.5,
        conv_weight=rnd(D, W) * 0.5,
        conv_bias=rnd(D) * 0.1,
        dt_proj_weight=rnd(D, RANK) * RANK ** -0.5,
        dt_proj_bias=torch.full((D,), -2.5, device=dev, dtype=dt),
        A_log=torch.log(torch.arange(1, N + 1, device=dev, dtype=torch.float32)).repeat(D, 1),
        D=torch.ones(D, device=dev),
    )
    if requires_grad:
        for v in args.values():
            v.requires_grad_(True)
    return args


def _floor_ms(batch, seqlen):
    return 65536 * batch * seqlen / EXP2_PER_S * 1e3


def packed_documents(batch, seqlen, mean=1000):
    """seq_idx (batch, seqlen) int32 on the GPU: packed documents of lengths uniform in [mean / 2, 3 mean / 2),
    restarting per row (also the diagnostics' documents: scripts/diag/scan_case.py)."""
    g = torch.Generator().manual_seed(batch * seqlen)
    rows = []
    for _ in range(batch):
        ids, doc = [], 0
        while len(ids) < seqlen:
            ids += [doc] * int(torch.randint(mean // 2, 3 * mean // 2, (1,), generator=g))
            doc += 1
        rows.append(ids[:seqlen])
    return torch.tensor(rows, dtype=torch.int32, device="cuda")


def _packed_on() -> bool:
    return os.environ.get("APRIEL_BENCH_SCAN_PACKED", "1") != "0"


def _row(phase, provider, batch, seqlen, stats, **extra):
    row = R.make_row("kernels", f"mixer_scan_{phase.replace('+', '_')}", provider, stats=stats, phase=phase,
                     shape=f"b{batch} L{seqlen}", batch=batch, seqlen=seqlen, dtype="bf16", **extra)
    R.add_rates(row, tokens=batch * seqlen, floor_ms=_floor_ms(batch, seqlen))
    bar = None if "packed" in provider else BARS.get((phase, batch, seqlen))
    if bar is not None:
        row.update(bar_ms=bar, meets_bar=bool(row["p50_ms"] <= bar), floor_ratio=row["p50_ms"] / row["floor_ms"])
    return row


def run(quick: bool = False) -> list[dict]:
    from apriel_kernels import mixer_scan
    from apriel_kernels._ext import has_kernel
    from apriel_kernels.mixer_scan import _checkpoint_mode

    kw = dict(d_inner=D, d_xb=X, d_state=N)
    if not (torch.cuda.is_available() and has_kernel("mixer_scan_fwd")):
        return [R.unavailable("kernels", "mixer_scan_fwd", "apriel", "needs CUDA and the built scan kernels")]
    out = []
    phases = os.environ.get("APRIEL_BENCH_SCAN_PHASES", "fwd,bwd").split(",")
    fwd_shapes = [(1, 2048), (1, 8192), (1, 32768), (8, 4096)] if not quick else [(1, 2048), (1, 8192)]
    if "fwd" not in phases:
        fwd_shapes = []
    for batch, seqlen in fwd_shapes:
        args = _inputs(batch, seqlen)
        variants = (("apriel", None, None), ("apriel-graph", None, None), ("apriel-v4k4", "v4k4", None),
                    ("apriel-v4k8", "v4k8", None), ("apriel-bcf32", None, "f32"), ("apriel-v3", "v3", None),
                    ("apriel-v4", "v4", None), ("apriel-v4-graph", "v4", None), ("apriel-v5", "v5", None),
                    ("apriel-v5-graph", "v5", None), ("apriel-v5k4", "v5k4", None), ("apriel-v5k8", "v5k8", None),
                    ("apriel-v7", "v7", None), ("apriel-v7-graph", "v7", None))
        keep = os.environ.get("APRIEL_BENCH_SCAN_FWD_PROVIDERS")
        if keep:
            variants = tuple(v for v in variants if v[0] in keep.split(","))
        for provider, version, bc in variants:
            try:
                timer = time_graph_ms if provider.endswith("graph") else time_ms
                with env_override("APRIEL_SCAN_FWD", version), env_override("APRIEL_SCAN_BC", bc), torch.no_grad():
                    stats = timer(lambda: mixer_scan(**args, **kw))
                out.append(_row("fwd", provider, batch, seqlen, stats))
            except Exception as e:  # noqa: BLE001 - a failing shape is a row, not a crash
                out.append(R.error_row("kernels", "mixer_scan_fwd", provider, e, shape=f"b{batch} L{seqlen}"))
        if _packed_on() and (batch, seqlen) in ((1, 8192), (8, 4096)):
            seq = packed_documents(batch, seqlen)
            docs = int((seq[:, 1:] != seq[:, :-1]).sum()) + batch
            for provider, varlen in (("apriel-packed", None), ("apriel-packed-graph", None),
                                     ("apriel-packed[varlen=0]", "0")):
                try:
                    timer = time_graph_ms if provider.endswith("graph") else time_ms
                    with env_override("APRIEL_SCAN_VARLEN", varlen), torch.no_grad():
                        stats = timer(lambda: mixer_scan(**args, **kw, seq_idx=seq))
                    out.append(_row("fwd", provider, batch, seqlen, stats, documents=docs))
                except Exception as e:  # noqa: BLE001
                    out.append(R.error_row("kernels", "mixer_scan_fwd", provider, e, shape=f"b{batch} L{seqlen}"))
    bwd_shapes = [(1, 8192), (4, 4096), (8, 4096)] if os.environ.get("APRIEL_BENCH_SCAN_BWD_B4") else [(1, 8192), (8, 4096)]
    for batch, seqlen in (bwd_shapes if not quick else [(1, 8192)]) if "bwd" in phases else ():
        args = _inputs(batch, seqlen, requires_grad=True)
        dy = torch.randn(batch, seqlen, D, device="cuda", dtype=torch.bfloat16)
        leaves = list(args.values())
        variants = (("apriel", None, None, None), ("apriel[ckpt=sub]", None, None, None),
                    ("apriel[bwd=v4]", None, "v4", None), ("apriel[bwd=v7]", None, "v7", None),
                    ("apriel[bwd-bc=f32]", None, None, "f32"), ("apriel[bwd=v3]", None, "v3", None),
                    ("apriel-v3", "v3", "v3", None))
        seq = packed_documents(batch, seqlen) if _packed_on() else None
        if seq is not None:
            variants += (("apriel-packed", None, None, None), ("apriel-packed[ckpt=sub]", None, None, None))
        if keep := os.environ.get("APRIEL_BENCH_SCAN_BWD_PROVIDERS"):
            variants = tuple(v for v in variants if v[0] in keep.split(","))
        for provider, version, bwd, bc in variants:
            ckpt = "sub" if provider.endswith("[ckpt=sub]") else None
            with env_override("APRIEL_SCAN_FWD", version), env_override("APRIEL_SCAN_BWD", bwd), \
                    env_override("APRIEL_SCAN_BWD_BC", bc), env_override("APRIEL_SCAN_CKPT", ckpt):
                try:
                    kw_call = dict(kw, seq_idx=seq) if "packed" in provider else kw

                    def step():  # this provider's call (packed documents or not)
                        y = mixer_scan(**args, **kw_call)
                        return torch.autograd.grad(y, leaves, dy)

                    stats = time_ms(step, rep_ms=300)
                    peak, grads_mb = peak_extra_mb(step)
                    # (sub-chunk checkpoints, mode 2, hold 4x the tile checkpoints: where the forward writes them)
                    mode = _checkpoint_mode(args["zxbc"], args["dt_low"], kw_call.get("seq_idx"), D, X, True)
                    ckpt_mb = batch * ((seqlen + 31) // 32) * D * N * 4 / 2**20 * (4 if mode == 2 else 1)
                    out.append(_row("fwd+bwd", provider, batch, seqlen, stats, peak_extra_mem_mb=peak,
                                    grads_mb=grads_mb, checkpoints_mb=ckpt_mb,
                                    note="peak_extra_mem_mb: allocated above the inputs during fwd+bwd, returned grads included"))
                    # the backward alone (forward outside the timed region)
                    y = mixer_scan(**args, **kw_call)
                    stats_b = time_ms(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), rep_ms=300)
                    out.append(_row("bwd", provider, batch, seqlen, stats_b))
                except Exception as e:  # noqa: BLE001
                    out.append(R.error_row("kernels", "mixer_scan_fwd_bwd", provider, e, shape=f"b{batch} L{seqlen}"))
    return out


def _format(r: dict) -> str:
    met = "yes" if r.get("meets_bar") else ("no" if "bar_ms" in r else "  ")
    peak = f"peak {r['peak_extra_mem_mb']:.0f} MB" if "peak_extra_mem_mb" in r else ""
    return (f"{r['phase']:8} {r['provider']:18} {r['shape']:12} {r['p50_ms']:9.4f} {r['floor_ms']:7.4f} "
            f"{r['p50_ms'] / r['floor_ms']:7.2f} {r.get('bar_ms', ''):>6} {met} {peak}")


def main(argv=None) -> int:
    header = f"{'phase':8} {'provider':18} {'shape':12} {'p50 ms':>9} {'floor':>7} {'x floor':>7} {'bar':>6} ok  extra"
    return R.suite_main(__doc__.splitlines()[0], run, _format, header, argv)


if __name__ == "__main__":
    sys.exit(main())
