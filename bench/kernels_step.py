"""Decode-step benchmark (issue 4): the fused apriel::mixer_step kernel against the bars of kernels.md,
the measured copy ceiling and a plain-torch imitation of the HF decode chain.

    run(quick=False) -> list[dict]   long-format rows: op, provider, batch, state_dtype, conv_layout, l2,
                                     p20_us, p50_us, p80_us, bytes, gb_per_s, pct_of_copy_ceiling,
                                     floor_us, bar_us, meets_bar, seq_per_warp (v3 sweeps), note +
                                     gpu/torch/commit
    python -m bench.kernels_step [--out step.json] [--quick] [--variants P1 P2 ...]   prints a table, writes JSON

Shape: Apriel-H1 mixer (D 4096, X 1024, N 16, R 16, W 4), bf16 activations and bf16 weights (A_log, D
fp32). Every time is per call, from CUDA-graph replays of back-to-back calls (bench/timing.time_graph_ms).
l2 = "hot": every call reuses the same cache slots, so at small batch the SSM cache (256 KB per sequence
in fp32) stays in the 50 MB L2 between calls - the method of the HF-chain figures in kernels.md;
l2 = "cold": consecutive calls walk through disjoint slot sets of a >= 200 MB cache pool, so every call
reads its state from DRAM, as in a real model where 49 other layers run between two calls of one layer.
The bars are judged on the cold figure.
Bytes (the floor): SSM cache read + written, conv window read (W-1) + written (S), the in_proj row
(z, x, B, C) and dt_low read, y written, layer parameters read once. floor_us = bytes / copy ceiling.
Providers: "apriel" (public mixer_step with out=, i.e. the default kernel v2; its sequences-per-thread
sweep, APRIEL_STEP_SEQ_PER_THREAD, was measured in session 2's first run and is no longer repeated), "apriel[v1]" (the first kernel,
APRIEL_STEP_KERNEL=v1, its own defaults: the A/B against v2 in the same run), "apriel[pdl]" (v2 launched
with programmatic dependent launch, APRIEL_STEP_PDL=1: consecutive steps of the graph overlap their
parameter prologue with the previous step's tail), "apriel[v3]" / "apriel[v3+pdl]" (kernel v3,
APRIEL_STEP_KERNEL=v3: state staged through shared memory by the TMA, parameters once per warp; without /
with PDL; since session 4 with the state as one tensor-map copy per row and direction and the conv rows staged on the
same barrier), "apriel[v3(+pdl),direct]" (the state stored from registers, APRIEL_STEP_V3_DIRECT_STORE=1),
"apriel[v3+pdl,tma]" (the map without staged conv rows), "apriel[v3(+pdl),lanecp]" (session 3's per-lane bulk copies),
"apriel[v3+pdl,seqK]" (v3 + PDL with K sequences per warp, APRIEL_STEP_V3_SEQ), "hf_chain_torch" (split, repeat,
roll-based conv update, dt Linear, selective_state_update written in torch ops, bf16 state, D-channel conv
cache, batch-indexed caches like HF: an imitation, because mamba-ssm / causal-conv1d are not installed
on the device; the real chain measured 18.3 / 23.2 / 38.3 / 99.4 us per kernels.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from .timing import measure_copy_bandwidth, time_graph_ms
from .variants import env_override

D_INNER, D_XB, D_STATE, DT_RANK, WIDTH = 4096, 1024, 16, 16, 4
BATCHES = [1, 16, 64, 256]
BARS_US = {1: 4.0, 16: 7.0, 64: 18.0, 256: 60.0}
HF_CHAIN_PEER_US = {1: 18.3, 16: 23.2, 64: 38.3, 256: 99.4}  # kernels.md (mamba-ssm + causal-conv1d)
COLD_POOL_BYTES = 200 << 20
# (provider, environment) of the kernel variants timed next to the default in the same run. Since session 4 the v3
# defaults are the tensor-map state copies with the conv rows staged on the same barrier (APRIEL_STEP_V3_TMA=1,
# APRIEL_STEP_V3_CONV_STAGE=1): "apriel[v3]" / "apriel[v3+pdl]" time them; ",tma" = the map without staged conv rows,
# ",lanecp" = the session-3 per-lane bulk copies, ",direct" = the state stored from registers
# (APRIEL_STEP_V3_DIRECT_STORE=1). The 8-deep ring (APRIEL_STEP_V3_STAGES=8, session 3: slower with fp32 state, no
# conv staging) is no longer timed by default.
VARIANTS = [
    ("apriel[v1]", {"APRIEL_STEP_KERNEL": "v1"}),
    ("apriel[v2]", {"APRIEL_STEP_KERNEL": "v2"}),  # default is v3 from b64 (step_api.cpp): keeps the A/B
    ("apriel[pdl]", {"APRIEL_STEP_PDL": "1"}),
    ("apriel[v3]", {"APRIEL_STEP_KERNEL": "v3"}),
    ("apriel[v3+pdl]", {"APRIEL_STEP_KERNEL": "v3", "APRIEL_STEP_PDL": "1"}),
    ("apriel[v3,direct]", {"APRIEL_STEP_KERNEL": "v3", "APRIEL_STEP_V3_DIRECT_STORE": "1"}),
    ("apriel[v3+pdl,direct]", {"APRIEL_STEP_KERNEL": "v3", "APRIEL_STEP_PDL": "1", "APRIEL_STEP_V3_DIRECT_STORE": "1"}),
    ("apriel[v3+pdl,tma]", {"APRIEL_STEP_KERNEL": "v3", "APRIEL_STEP_PDL": "1", "APRIEL_STEP_V3_CONV_STAGE": "0"}),
    ("apriel[v3,lanecp]", {"APRIEL_STEP_KERNEL": "v3", "APRIEL_STEP_V3_TMA": "0"}),
    ("apriel[v3+pdl,lanecp]", {"APRIEL_STEP_KERNEL": "v3", "APRIEL_STEP_PDL": "1", "APRIEL_STEP_V3_TMA": "0"}),
    ("apriel[v3,st8]", {"APRIEL_STEP_KERNEL": "v3", "APRIEL_STEP_V3_STAGES": "8"}),  # 8-deep ring: --variants only
]
ACT = torch.bfloat16


def _environment() -> dict[str, str]:
    try:
        from .rows import environment

        return environment()
    except Exception:  # noqa: BLE001 - metadata must not kill a benchmark
        return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                "commit": os.environ.get("APRIEL_BENCH_COMMIT", "unknown")}


def _layer(device="cuda") -> dict[str, torch.Tensor]:
    a_log = torch.log(torch.arange(1, D_STATE + 1, dtype=torch.float32, device=device)).expand(D_INNER, D_STATE)
    return dict(
        conv_weight=(0.5 * torch.randn(D_INNER, WIDTH, device=device)).to(ACT),
        conv_bias=(0.1 * torch.randn(D_INNER, device=device)).to(ACT),
        dt_proj_weight=((torch.rand(D_INNER, DT_RANK, device=device) * 2 - 1) * DT_RANK**-0.5).to(ACT),
        dt_proj_bias=(torch.rand(D_INNER, device=device) * 2 - 2).to(ACT),
        A_log=(a_log + 0.1 * torch.randn(D_INNER, D_STATE, device=device)).contiguous(),
        D=torch.randn(D_INNER, device=device),
    )


def step_bytes(batch: int, state_dtype: torch.dtype, conv_channels: int, state_len: int) -> int:
    """Bytes a perfect fused step moves (see the module docstring)."""
    act = torch.finfo(ACT).bits // 8
    state = 2 * batch * D_INNER * D_STATE * torch.finfo(state_dtype).bits // 8
    conv = batch * conv_channels * (WIDTH - 1 + state_len) * act
    rows = batch * ((2 * D_INNER + 2 * D_XB) + DT_RANK + D_INNER) * act  # zxbc + dt_low read, y written
    params = D_INNER * (D_STATE * 4 + DT_RANK * act + WIDTH * act + 2 * act + 4)
    return state + conv + rows + params


def _apriel_fn(batch: int, state_dtype: torch.dtype, conv_layout: str, cold: bool):
    """(fn cycling over slot sets, calls per graph, bytes per call)."""
    from apriel_kernels import mixer_step

    layer = _layer()
    conv_channels, state_len = (D_XB, WIDTH - 1) if conv_layout == "compact" else (D_INNER, WIDTH)
    per_seq = D_INNER * D_STATE * torch.finfo(state_dtype).bits // 8 + conv_channels * state_len * 2
    sets = max(1, math.ceil(COLD_POOL_BYTES / (batch * per_seq))) if cold else 1
    slots = sets * batch
    conv = torch.randn(slots, conv_channels, state_len, device="cuda").to(ACT)
    ssm = (0.5 * torch.randn(slots, D_INNER // D_STATE, D_STATE, D_STATE, device="cuda")).to(state_dtype)
    zxbc = torch.randn(batch, 2 * D_INNER + 2 * D_XB, device="cuda").to(ACT)
    dt_low = torch.randn(batch, DT_RANK, device="cuda").to(ACT)
    out = torch.empty(batch, D_INNER, device="cuda", dtype=ACT)
    perm = torch.randperm(slots, device="cuda").to(torch.int32)
    slot_sets = [perm[i * batch : (i + 1) * batch].contiguous() for i in range(sets)]
    counter = [0]

    def fn():
        idx = slot_sets[counter[0] % sets]
        counter[0] += 1
        mixer_step(zxbc, dt_low, conv, ssm, idx, layer["conv_weight"], layer["conv_bias"], layer["dt_proj_weight"],
                   layer["dt_proj_bias"], layer["A_log"], layer["D"], d_inner=D_INNER, d_xb=D_XB, d_state=D_STATE,
                   out=out)

    per_graph = max(20, sets) if cold else 20
    return fn, per_graph, step_bytes(batch, state_dtype, conv_channels, state_len)


def _hf_chain_fn(batch: int):
    """Plain-torch imitation of the HF decode chain (bf16 state and D-channel conv cache, like HF)."""
    layer = _layer()
    conv_state = torch.randn(batch, D_INNER, WIDTH, device="cuda").to(ACT)
    ssm_state = (0.5 * torch.randn(batch, D_INNER, D_STATE, device="cuda")).to(ACT)
    zxbc = torch.randn(batch, 2 * D_INNER + 2 * D_XB, device="cuda").to(ACT)
    dt_low = torch.randn(batch, DT_RANK, device="cuda").to(ACT)
    A = -torch.exp(layer["A_log"])
    r = D_INNER // D_XB

    def fn():
        z, x, B, C = torch.split(zxbc, [D_INNER, D_XB, D_XB, D_INNER], dim=-1)
        # repeat_kv of x and B: (b, X/N, N) -> (b, D/N, N) by repeating each 16-group r times
        x_rep = x.view(batch, D_XB // D_STATE, 1, D_STATE).expand(-1, -1, r, -1).reshape(batch, D_INNER)
        B_rep = B.view(batch, D_XB // D_STATE, 1, D_STATE).expand(-1, -1, r, -1).reshape(batch, D_INNER // D_STATE, D_STATE)
        # causal_conv1d_update
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x_rep
        u = F.silu((conv_state * layer["conv_weight"]).sum(-1) + layer["conv_bias"])
        dt = F.linear(dt_low, layer["dt_proj_weight"], layer["dt_proj_bias"])
        # selective_state_update (dt_bias = the same bias again, softplus)
        delta = F.softplus(dt.float() + layer["dt_proj_bias"].float())
        dA = torch.exp(delta.unsqueeze(-1) * A)
        Bc = B_rep.repeat_interleave(D_STATE, dim=1).float()
        Cc = C.view(batch, D_INNER // D_STATE, D_STATE).repeat_interleave(D_STATE, dim=1).float()
        new_state = ssm_state.float() * dA + (delta * u.float()).unsqueeze(-1) * Bc
        ssm_state.copy_(new_state)
        y = (new_state * Cc).sum(-1) + layer["D"] * u.float()
        return (y * F.silu(z.float())).to(ACT)

    bytes_hf = step_bytes(batch, ACT, D_INNER, WIDTH)
    return fn, 20, bytes_hf


def _row(op, provider, batch, state_dtype, conv_layout, l2, stats_ms, nbytes, copy_bps, **extra) -> dict[str, Any]:
    p50_us = stats_ms["p50"] * 1e3
    floor_us = nbytes / copy_bps * 1e6
    row = {
        "op": op, "provider": provider, "batch": batch, "state_dtype": str(state_dtype).replace("torch.", ""),
        "conv_layout": conv_layout, "l2": l2,
        "p20_us": stats_ms["p20"] * 1e3, "p50_us": p50_us, "p80_us": stats_ms["p80"] * 1e3,
        "bytes": nbytes, "gb_per_s": nbytes / (p50_us * 1e-6) / 1e9,
        "pct_of_copy_ceiling": 100.0 * floor_us / p50_us, "floor_us": floor_us,
    }
    row.update(extra)
    return row


def _variant_rows(batch: int, variants, copy_bps: float) -> list[dict[str, Any]]:
    """Cold-L2 rows of the given (provider, environment) kernel variants at one batch, both state dtypes."""
    rows = []
    for provider, env in variants:
        for state_dtype in (torch.float32, torch.bfloat16):
            with contextlib.ExitStack() as stack:
                for var, value in env.items():
                    stack.enter_context(env_override(var, value))
                fn, per_graph, nbytes = _apriel_fn(batch, state_dtype, "compact", True)
                stats = time_graph_ms(fn, per_graph=per_graph)
            extra = {"bar_us": BARS_US[batch], "meets_bar": stats["p50"] * 1e3 <= BARS_US[batch]} \
                if state_dtype == torch.float32 else {}
            rows.append(_row("mixer_step", provider, batch, state_dtype, "compact", "cold", stats, nbytes,
                             copy_bps, **extra))
            torch.cuda.empty_cache()
    return rows


def run_variants(providers: list[str]) -> list[dict[str, Any]]:
    """Only the named variant rows (cold, both state dtypes) at every batch: a short A/B run (--variants)."""
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels_step needs a CUDA device")
    known = dict(VARIANTS)
    unknown = [p for p in providers if p not in known]
    if unknown:
        raise SystemExit(f"--variants: unknown provider(s) {unknown}; known: {sorted(known)}")
    torch.manual_seed(0)
    copy_bps = measure_copy_bandwidth()
    rows: list[dict[str, Any]] = [{"op": "copy_ceiling", "provider": "torch", "gb_per_s": copy_bps / 1e9,
                                   "note": "1 GiB device-to-device copy, bytes read + written"}]
    for batch in BATCHES:
        rows += _variant_rows(batch, [(p, known[p]) for p in providers], copy_bps)
    env = _environment()
    for row in rows:
        row.update(env)
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels_step needs a CUDA device")
    torch.manual_seed(0)
    copy_bps = measure_copy_bandwidth()
    rows: list[dict[str, Any]] = [{"op": "copy_ceiling", "provider": "torch", "gb_per_s": copy_bps / 1e9,
                                   "note": "1 GiB device-to-device copy, bytes read + written"}]
    batches = [1, 64] if quick else BATCHES
    for batch in batches:
        for state_dtype in (torch.float32, torch.bfloat16):
            for cold in (False, True):
                fn, per_graph, nbytes = _apriel_fn(batch, state_dtype, "compact", cold)
                stats = time_graph_ms(fn, per_graph=per_graph)
                extra = {}
                if state_dtype == torch.float32:
                    extra = {"bar_us": BARS_US[batch], "meets_bar": stats["p50"] * 1e3 <= BARS_US[batch]}
                rows.append(_row("mixer_step", "apriel", batch, state_dtype, "compact", "cold" if cold else "hot",
                                 stats, nbytes, copy_bps, **extra))
                torch.cuda.empty_cache()
        fn, per_graph, nbytes = _apriel_fn(batch, torch.float32, "d_channels", True)
        rows.append(_row("mixer_step", "apriel", batch, torch.float32, "d_channels", "cold",
                         time_graph_ms(fn, per_graph=per_graph), nbytes, copy_bps))
        # Kernel variants, cold L2 (the bars' condition), both state dtypes: v1, v2 with PDL, v3 (TMA-staged
        # state), v3 with PDL.
        rows += _variant_rows(batch, [v for v in VARIANTS if not v[0].endswith(",st8]")], copy_bps)
        if not quick and batch >= 64:
            # v3 sequences per warp (the launcher picks ceil(channel warps x batch / resident warps): 4 at
            # b64, 16 at b256 on an H100 with 4 resident blocks per SM).
            for spw in ("2", "4", "8", "16", "32"):  # with PDL (the engine's decode graphs) since session 4
                with env_override("APRIEL_STEP_KERNEL", "v3"), env_override("APRIEL_STEP_V3_SEQ", spw), \
                        env_override("APRIEL_STEP_PDL", "1"):
                    fn, per_graph, nbytes = _apriel_fn(batch, torch.float32, "compact", True)
                    stats = time_graph_ms(fn, per_graph=per_graph)
                rows.append(_row("mixer_step", f"apriel[v3+pdl,seq{spw}]", batch, torch.float32, "compact", "cold",
                                 stats, nbytes, copy_bps, seq_per_warp=int(spw)))
                torch.cuda.empty_cache()
        fn, per_graph, nbytes = _hf_chain_fn(batch)
        rows.append(_row("mixer_step", "hf_chain_torch", batch, ACT, "d_channels", "hot",
                         time_graph_ms(fn, per_graph=per_graph), nbytes, copy_bps,
                         note=f"torch-op imitation; real HF chain (mamba-ssm Triton + causal-conv1d) per kernels.md: "
                              f"{HF_CHAIN_PEER_US[batch]} us"))
        torch.cuda.empty_cache()
    env = _environment()
    for row in rows:
        row.update(env)
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'provider':<18}{'b':>5} {'state':<9}{'conv':<11}{'l2':<5}{'p50 us':>9}{'p20':>8}{'p80':>8}{'GB/s':>8}{'%copy':>7}{'floor':>8}{'bar':>7}"
    print(head)
    for r in rows:
        if r["op"] == "copy_ceiling":
            print(f"copy ceiling: {r['gb_per_s']:.0f} GB/s")
            continue
        bar = f"{r['bar_us']:.0f}{'ok' if r['meets_bar'] else '!!'}" if "bar_us" in r else ""
        print(f"{r['provider']:<18}{r['batch']:>5} {r['state_dtype']:<9}{r['conv_layout']:<11}{r['l2']:<5}"
              f"{r['p50_us']:>9.2f}{r['p20_us']:>8.2f}{r['p80_us']:>8.2f}{r['gb_per_s']:>8.0f}"
              f"{r['pct_of_copy_ceiling']:>7.1f}{r['floor_us']:>8.2f}{bar:>7}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 64 only, no sweeps")
    parser.add_argument("--variants", nargs="+", metavar="PROVIDER",
                        help="providers of VARIANTS (names contain commas: one argument each, or ';'-separated): only "
                             "their cold rows, every batch, e.g. --variants 'apriel[v3+pdl,tma]' 'apriel[v3+pdl,lanecp]'")
    args = parser.parse_args(argv)
    providers = [p for arg in args.variants or [] for p in arg.split(";") if p]
    rows = run_variants(providers) if providers else run(quick=args.quick)
    _print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": _environment(), "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
