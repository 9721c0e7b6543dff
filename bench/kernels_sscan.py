"""Benchmark of the generic / mamba-compatible selective scan (issue 3 item 3) at the mamba shape.

    run(quick=False) -> list[dict]      long-format rows (bench/rows.py keys)
    python -m bench.kernels_sscan --out FILE [--quick]

Inputs are channel-major like mamba-ssm's selective_scan_fn (u, delta, z (b, D, L) bf16; B, C (b, N, L)
bf16; A (D, N), D, delta_bias fp32; delta_softplus), D 4096, N 16; the timed call is
apriel_kernels.selective_scan_fn (fwd), plus torch.autograd.grad to every input (fwd+bwd). Provider
"apriel" is the default (at this shape the forward / backward v7, with their sequence splits at small batches since
session 27; v2 where v7 does not apply); "apriel-tm" runs the same op on token-major
(b, L, D) inputs (selective_scan); A/B rows through APRIEL_SSCAN_FWD: "apriel-v2k4" / "apriel-v2k8" (v2 at a
forced K), "apriel-precise" (v2 with v1's precise softplus / sigmoid in its prep, APRIEL_SSCAN_SOFTPLUS=precise),
"apriel-v1" (the v1 forward), "apriel-v7" / "apriel-tm-v7" (the forward v7 forced, channel- / token-major;
in fwd+bwd its checkpoints feed the default backward), "apriel-plain" (v1 without its interleaved float2 tiles; with
APRIEL_SSCAN_BWD=plain in the fwd+bwd row). In fwd+bwd the forward saves the state checkpoints (the backward
does not rerun it); "apriel-v1" there is the same with the v1 forward. "apriel-bwd2" / "apriel-bwd7" rows: the
backward v2 / v7 (session 26) forced (APRIEL_SSCAN_BWD=v2 / v7; v7 with its split's default segment count).
floor_ms is the MUFU exp2
floor of kernels.md: 65536 * b * L exponentials at 3.9e12 /s; peer_ms the mamba-ssm figure of kernels.md.
"""
from __future__ import annotations

import sys

import torch

from . import rows as R
from .timing import peak_extra_mb, time_ms
from .variants import env_override

D, N = 4096, 16
EXP2_PER_S = 3.9e12
PEER_MS = {("fwd", 1, 2048): 0.195, ("fwd", 1, 8192): 0.759, ("fwd", 8, 4096): 2.60, ("fwd+bwd", 1, 8192): 3.92,
           ("fwd+bwd", 8, 4096): 14.4}


def _inputs(batch, seqlen, channel_major=True, requires_grad=False):
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, dtype=dt: torch.randn(*s, device=dev, dtype=dtype, generator=g)  # noqa: E731
    act = (lambda: rnd(batch, D, seqlen)) if channel_major else (lambda: rnd(batch, seqlen, D))
    bc = (lambda: rnd(batch, N, seqlen)) if channel_major else (lambda: rnd(batch, seqlen, 1, N))
    args = dict(
        u=act(), delta=act() * 0.5 - 2.0, A=-torch.arange(1, N + 1, device=dev, dtype=torch.float32).repeat(D, 1),
        B=bc(), C=bc(), D=torch.ones(D, device=dev), z=act(), delta_bias=rnd(D, dtype=torch.float32) * 0.1,
    )
    if requires_grad:
        for v in args.values():
            v.requires_grad_(True)
    return args


def _floor_ms(batch, seqlen):
    return 65536 * batch * seqlen / EXP2_PER_S * 1e3


def _row(phase, provider, batch, seqlen, stats, **extra):
    row = R.make_row("kernels", f"selective_scan_{phase.replace('+', '_')}", provider, stats=stats, phase=phase,
                     shape=f"b{batch} L{seqlen}", batch=batch, seqlen=seqlen, dtype="bf16", **extra)
    R.add_rates(row, tokens=batch * seqlen, floor_ms=_floor_ms(batch, seqlen))
    row["floor_ratio"] = row["p50_ms"] / row["floor_ms"]
    peer = PEER_MS.get((phase, batch, seqlen))
    if peer is not None:
        row.update(peer_ms=peer, peer_ratio=row["p50_ms"] / peer)
    return row


def _fwd_bwd_case(batch, seqlen):
    """(fwd_bwd, time_bwd): fwd_bwd() runs selective_scan_fn on the channel-major inputs and torch.autograd.grad to
    every input from a channel-major dy; time_bwd() times that backward alone, from one saved forward."""
    from apriel_kernels import selective_scan_fn

    args = _inputs(batch, seqlen, requires_grad=True)
    dy = torch.randn(batch, D, seqlen, device="cuda", dtype=torch.bfloat16)
    leaves, kw = list(args.values()), dict(delta_softplus=True)

    def fwd_bwd():
        y = selective_scan_fn(**args, **kw)
        return torch.autograd.grad(y, leaves, dy)

    def time_bwd():
        y = selective_scan_fn(**args, **kw)
        return time_ms(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), rep_ms=300)

    return fwd_bwd, time_bwd


def run(quick: bool = False) -> list[dict]:
    from apriel_kernels import selective_scan, selective_scan_fn
    from apriel_kernels._ext import has_kernel

    if not (torch.cuda.is_available() and has_kernel("selective_scan_fwd")):
        return [R.unavailable("kernels", "selective_scan_fwd", "apriel", "needs CUDA and the built sscan kernels")]
    kw = dict(delta_softplus=True)
    out = []
    for batch, seqlen in ([(1, 2048), (1, 8192), (8, 4096)] if not quick else [(1, 2048), (1, 8192)]):
        for provider, cm, variant in (("apriel", True, None), ("apriel-tm", False, None), ("apriel-v2k4", True, "v2k4"),
                                      ("apriel-v2k8", True, "v2k8"), ("apriel-precise", True, "precise"),
                                      ("apriel-v1", True, "v1"), ("apriel-plain", True, "plain"),
                                      ("apriel-v7", True, "v7"), ("apriel-tm-v7", False, "v7")):
            try:
                args = _inputs(batch, seqlen, channel_major=cm)
                fn = selective_scan_fn if cm else selective_scan
                fwd_env = None if variant == "precise" else variant
                softplus_env = "precise" if variant == "precise" else None
                with torch.no_grad(), env_override("APRIEL_SSCAN_FWD", fwd_env), \
                        env_override("APRIEL_SSCAN_SOFTPLUS", softplus_env):
                    stats = time_ms(lambda: fn(**args, **kw))  # noqa: B023 - called inside the iteration
                out.append(_row("fwd", provider, batch, seqlen, stats, layout="channel-major" if cm else "token-major"))
                del args
            except Exception as e:  # noqa: BLE001 - a failing shape is a row, not a crash
                out.append(R.error_row("kernels", "selective_scan_fwd", provider, e, shape=f"b{batch} L{seqlen}"))
    for batch, seqlen in ([(1, 8192), (8, 4096)] if not quick else [(1, 8192)]):
        try:
            step, time_bwd = _fwd_bwd_case(batch, seqlen)
            if batch == 1:  # A/B: v1 forward (both passes), and v1 with the plain tile loops (forward and backward)
                with env_override("APRIEL_SSCAN_FWD", "v1"):
                    out.append(_row("fwd+bwd", "apriel-v1", batch, seqlen, time_ms(step, rep_ms=300),
                                    layout="channel-major"))
                with env_override("APRIEL_SSCAN_FWD", "plain"), env_override("APRIEL_SSCAN_BWD", "plain"):
                    out.append(_row("fwd+bwd", "apriel-plain", batch, seqlen, time_ms(step, rep_ms=300),
                                    layout="channel-major"))
            with env_override("APRIEL_SSCAN_FWD", "v7"):  # A/B: the v7 forward (its checkpoints feed the backward)
                out.append(_row("fwd+bwd", "apriel-v7", batch, seqlen, time_ms(step, rep_ms=300),
                                layout="channel-major"))
            stats = time_ms(step, rep_ms=300)
            peak, grads_mb = peak_extra_mb(step)
            out.append(_row("fwd+bwd", "apriel", batch, seqlen, stats, layout="channel-major",
                            peak_extra_mem_mb=peak, grads_mb=grads_mb,
                            checkpoints_mb=batch * ((seqlen + 31) // 32) * D * N * 4 / 2**20,
                            note="the forward saves fp32 state checkpoints every 32 tokens for the backward; "
                                 "peak_extra_mem_mb: allocated above the inputs, returned grads included"))
            out.append(_row("bwd", "apriel", batch, seqlen, time_bwd(), layout="channel-major"))
            del step, time_bwd
        except Exception as e:  # noqa: BLE001
            out.append(R.error_row("kernels", "selective_scan_fwd_bwd", "apriel", e, shape=f"b{batch} L{seqlen}"))
    # Backward A/B (APRIEL_SSCAN_BWD=v2 / v7, forced) last: a fault there must not cost the rows above.
    for batch, seqlen in ([(1, 8192), (8, 4096)] if not quick else [(1, 8192)]):
        for provider, variant in (("apriel-bwd2", "v2"), ("apriel-bwd7", "v7")):
            try:
                step, time_bwd = _fwd_bwd_case(batch, seqlen)
                with env_override("APRIEL_SSCAN_BWD", variant):
                    stats = time_ms(step, rep_ms=300)
                    peak, _ = peak_extra_mb(step)
                    out.append(_row("fwd+bwd", provider, batch, seqlen, stats, layout="channel-major",
                                    peak_extra_mem_mb=peak))
                    out.append(_row("bwd", provider, batch, seqlen, time_bwd(), layout="channel-major"))
                del step, time_bwd
            except Exception as e:  # noqa: BLE001
                out.append(R.error_row("kernels", "selective_scan_fwd_bwd", provider, e, shape=f"b{batch} L{seqlen}"))
    return out


def _format(r: dict) -> str:
    peak = f"peak {r['peak_extra_mem_mb']:.0f} MB" if "peak_extra_mem_mb" in r else ""
    return (f"{r['phase']:8} {r['provider']:10} {r['shape']:12} {r['p50_ms']:9.4f} {r['floor_ms']:7.4f} "
            f"{r['floor_ratio']:7.2f} {r.get('peer_ms', ''):>6} {r.get('peer_ratio', float('nan')):7.2f}  {peak}")


def main(argv=None) -> int:
    header = (f"{'phase':8} {'provider':10} {'shape':12} {'p50 ms':>9} {'floor':>7} {'x floor':>7} {'mamba':>6} "
              f"{'x mamba':>7}  extra")
    return R.suite_main(__doc__.splitlines()[0], run, _format, header, argv)


if __name__ == "__main__":
    sys.exit(main())
