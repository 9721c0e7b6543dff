"""Decode throughput of apriel_model's engine at long context: all-attention vs H1 hybrid layouts.

    python -m bench.e2e_decode [--out rows.json] [--preset apriel-15b] [--layers 50] [--context 16384]
                               [--layouts all-attention,H1-30,H1-40] [--steps 15] [--quick] [--device cuda]

For each layout: random bf16 weights of the preset's shape on the GPU, an Engine whose batch is the largest
that fits next to the weights (KV of attention layers + mixer states per sequence, for context + steps
tokens, with a fixed margin for activations), caches filled to `context` tokens per sequence (random K/V
and mixer states written straight into the cache: a real 16k prefill of every sequence would cost minutes
and does not change what a decode step reads), then the engine's decode step (CUDA graph of the whole
step: embedding -> SDPA over the KV cache / fused mixer step -> logits) timed over `steps` steps.

Rows (bench.rows format, suite "e2e", op "model_decode", provider "apriel_model-engine"): batch, context,
p20/p50/p80 step ms, tokens/s, weights and cache GB, bytes per step (weights except the embedding table +
KV read for `context` tokens + mixer states read and written), floor_ms = bytes / 3.0 TB/s (the issue's
bandwidth bound) and pct_of_floor; then one "model_decode_speedup" row per hybrid layout (tokens/s over
all-attention). Same engine, same code path for every layout.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

BOUND_BYTES_PER_S = 3.0e12
GiB = 1 << 30
MARGIN_BYTES = 3 * GiB  # activations, logits, graph pool, SDPA workspace


def _rows_module():
    try:
        from bench import rows
        return rows
    except Exception:  # noqa: BLE001  (the script also runs alone)
        return None


def _has_kernel(name: str) -> bool:
    try:
        from apriel_kernels._ext import has_kernel
        return bool(has_kernel(name))
    except Exception:  # noqa: BLE001
        return False


def _quantiles(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"p20": q[0], "p50": q[1], "p80": q[2]}


def build_model(preset: str, layout: str, layers: int, device: torch.device):
    import apriel_model as am
    from apriel_model.presets import get_preset

    cfg = get_preset(preset, layout=layout, num_hidden_layers=layers)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise 15B fp32 weights
    try:
        with torch.device(device):
            model = am.AprielHybridForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def weight_bytes_per_step(model) -> int:
    """Every parameter is read once per step, except the embedding table (b rows only)."""
    emb = model.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)


@torch.no_grad()
def fill_cache(cache, batch: int, context: int, generator: torch.Generator) -> None:
    """Make slots 0..batch-1 look like sequences of `context` tokens (random K/V and states)."""
    for t in (*cache.keys.values(), *cache.values.values()):
        t[:batch].normal_(generator=generator)  # contiguous: no temporary; keys past `context` are masked
    for t in cache.conv.values():
        t[:batch].normal_(generator=generator)
    for t in cache.ssm.values():
        t[:batch].normal_(generator=generator).mul_(0.1)
    cache.lengths[:batch] = context
    cache.key_valid[:batch, :context] = True


def _profile_step(engine, tokens, batch: int, top: int = 12) -> str:
    """CUDA time per kernel family over one eager decode step (graphs hide kernels from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    lengths = engine.cache.lengths.clone()
    try:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine._decode_eager(tokens.reshape(-1, 1), static_kv=True)  # the graph's code path, uncaptured
            torch.cuda.synchronize()
    finally:
        engine.cache.lengths.copy_(lengths)
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / 1e3
    parts = [f"{e.key[:60]}={e.device_time_total / 1e3:.2f}ms/{e.count}" for e in events[:top]]
    return f"total_kernel_ms={total:.2f}; " + "; ".join(parts)


def _time_decode(model, args, batch: int, max_seqlen: int, graphs: bool, device: torch.device):
    """Engine with `batch` slots filled to args.context, captured, warmed up, then args.steps timed steps."""
    from apriel_model.engine import Engine

    engine = Engine(model, max_batch=batch, max_seqlen=max_seqlen, cuda_graphs=graphs, decode_splits=args.decode_splits,
                    decode_attention=args.decode_attn)
    gen = torch.Generator(device=device).manual_seed(0)
    fill_cache(engine.cache, batch, args.context, gen)
    note = ""
    if graphs:
        try:
            engine.capture([batch])
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001  (no kernel / not capturable: measure eager, say so)
            note = f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); eager decode timed"
            engine.use_graphs = False
            fill_cache(engine.cache, batch, args.context, gen)
    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=device, generator=gen)
    for _ in range(3):
        engine.decode(tokens)
    times = []
    logits = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(args.steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            logits = engine.decode(tokens)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(args.steps):
            t = time.perf_counter()
            logits = engine.decode(tokens)
            times.append((time.perf_counter() - t) * 1e3)
    return engine, times, logits, note


def measure_layout(args, layout: str, device: torch.device) -> dict:
    t0 = time.time()
    model = build_model(args.preset, layout, args.layers, device)
    cfg = model.config
    max_seqlen = -(-(args.context + args.steps + 8) // 256) * 256  # 256-multiple: split-K chunks up to 8
    wbytes = weight_bytes_per_step(model)
    # per-sequence cache bytes at capacity (what must fit) and per step at `context` (what is read)
    n_attn, n_mix = cfg.layout_counts["t"], cfg.layout_counts["m2"]
    kv_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 2  # bf16 K + V per attention layer
    d_inner, d_xb, d_state, _, d_conv = cfg.mixer_dims()
    state_bytes = n_mix * (d_inner * d_state * 4 + d_xb * (d_conv - 1) * 2)
    slot_bytes = n_attn * kv_token * max_seqlen + state_bytes + max_seqlen  # + key_valid
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        batch = int((free - args.margin_gb * GiB) // slot_bytes)
    else:
        free, total = 0, 0
        batch = 4
    if args.max_batch:
        batch = min(batch, args.max_batch)
    if batch < 1:
        raise RuntimeError(f"no room for one sequence of {max_seqlen} tokens next to {wbytes / GiB:.1f} GiB of weights")
    graphs = device.type == "cuda" and not args.eager
    for attempt in range(4):  # an OOM anywhere (cache, capture, timing) retries with 8% fewer sequences
        try:
            engine, times, logits, note = _time_decode(model, args, batch, max_seqlen, graphs, device)
            break
        except torch.OutOfMemoryError:
            if attempt == 3:
                raise
            engine = None
            gc.collect()
            torch.cuda.empty_cache()
            batch = max(1, int(batch * 0.92))
    tokens = torch.randint(0, cfg.vocab_size, (batch,), device=device)
    ok = bool(torch.isfinite(logits.float()).all())
    profile = _profile_step(engine, tokens, batch) if args.profile and device.type == "cuda" else None
    stats = _quantiles(times)
    context_read = args.context + 3 + args.steps // 2  # mean context over the timed steps
    cache_step = batch * (n_attn * kv_token * context_read + 2 * state_bytes)
    bytes_step = wbytes + cache_step
    floor_ms = bytes_step / BOUND_BYTES_PER_S * 1e3
    row = {
        "suite": "e2e", "op": "model_decode", "provider": "apriel_model-engine", "status": "ok" if ok else "error",
        "layout": layout, "preset": args.preset, "layers": args.layers, "attention_layers": n_attn,
        "mixer_layers": n_mix, "batch": batch, "context": args.context, "max_seqlen": max_seqlen,
        "shape": json.dumps({"preset": args.preset, "layers": args.layers, "layout": layout, "batch": batch,
                             "context": args.context}),
        "p20_ms": stats["p20"], "p50_ms": stats["p50"], "p80_ms": stats["p80"],
        "tokens_per_s": batch / (stats["p50"] * 1e-3),
        "weights_gb": wbytes / 1e9, "cache_gb": engine.cache.memory_bytes() / 1e9,
        "cache_read_gb_per_step": cache_step / 1e9, "bytes_per_step": bytes_step,
        "floor_ms": floor_ms, "pct_of_floor": 100.0 * floor_ms / stats["p50"],
        "gb_per_s": bytes_step / (stats["p50"] * 1e-3) / 1e9,
        "cuda_graph": bool(engine.use_graphs), "steps": args.steps,
        "decode_attention": engine.decode_kernel, "margin_gb": args.margin_gb,
        "decode_splits": engine.splits_for(batch), "mixer_step_kernel": _has_kernel("mixer_step"), "engine_notes": "; ".join(engine.notes),
        "mem_total_gb": total / 1e9, "mem_peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0,
        "setup_s": time.time() - t0, "profile_top_kernels": profile, "note": note or ("logits not finite" if not ok else ""),
    }
    del engine, model, logits
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def _write(args, rows: list[dict]) -> None:
    rows_mod = _rows_module()
    if rows_mod is not None:
        stamped = rows_mod.stamp(rows, rows_mod.environment())
        rows_mod.write_json(args.out, stamped, meta={"script": "bench/e2e_decode.py", "args": vars(args)})
    else:
        with open(args.out, "w") as f:
            json.dump({"meta": {"args": vars(args)}, "rows": rows}, f, indent=1, default=str)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="e2e_decode.json")
    p.add_argument("--preset", default="apriel-15b")
    p.add_argument("--layers", type=int, default=None, help="default: the preset's (50 for apriel-15b)")
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--layouts", default="all-attention,H1-30,H1-40")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--max-batch", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--decode-splits", default="auto", help="split-K decode attention: auto or an int (0 = off)")
    p.add_argument("--decode-attn", default="auto", choices=("auto", "fused", "sdpa"),
                   help="decode attention: apriel_kernels' fused split-K kernel or torch SDPA (auto: fused on CUDA)")
    p.add_argument("--margin-gb", type=float, default=MARGIN_BYTES / GiB,
                   help="GiB kept free next to weights + caches when picking the batch (activations, graph pool)")
    p.add_argument("--quick", action="store_true", help="10 layers, 4k context, 8 steps")
    p.add_argument("--profile", action="store_true", help="add the top kernels of one eager step to each row")
    args = p.parse_args(argv)
    if args.decode_splits != "auto":
        args.decode_splits = int(args.decode_splits)
    from apriel_model.presets import PRESETS

    if args.quick:
        args.layers, args.context, args.steps = args.layers or 10, min(args.context, 4096), min(args.steps, 8)
    args.layers = args.layers or PRESETS[args.preset]["num_hidden_layers"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    rows = []
    for layout in args.layouts.split(","):
        try:
            rows.append(measure_layout(args, layout, device))
        except Exception as e:  # noqa: BLE001  (one failing layout must not hide the others)
            rows.append({"suite": "e2e", "op": "model_decode", "provider": "apriel_model-engine", "status": "error",
                         "layout": layout, "note": f"{type(e).__name__}: {e}"[:500]})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _write(args, rows)  # after every layout: a run cut short still leaves its rows
        r = rows[-1]
        print(f"{layout:14s} status={r['status']} batch={r.get('batch')} p50={r.get('p50_ms', float('nan')):.2f} ms "
              f"tok/s={r.get('tokens_per_s', float('nan')):.0f} %bound={r.get('pct_of_floor', float('nan')):.1f} "
              f"{r.get('note', '')}", flush=True)
        if r.get("profile_top_kernels"):
            print(f"  profile: {r['profile_top_kernels']}", flush=True)
        if r.get("engine_notes"):
            print(f"  engine: {r['engine_notes']}", flush=True)
    base = next((r for r in rows if r.get("layout") == "all-attention" and r["status"] == "ok"), None)
    for r in list(rows):
        if base is not None and r is not base and r["status"] == "ok" and r["op"] == "model_decode":
            rows.append({"suite": "e2e", "op": "model_decode_speedup", "provider": "apriel_model-engine",
                         "status": "ok", "layout": r["layout"], "baseline": "all-attention",
                         "speedup": r["tokens_per_s"] / base["tokens_per_s"],
                         "batch": r["batch"], "baseline_batch": base["batch"], "context": args.context,
                         "layers": args.layers})
            print(f"{r['layout']:14s} speedup over all-attention: {rows[-1]['speedup']:.2f}x", flush=True)
    _write(args, rows)
    print(f"{'layout':14s} {'batch':>5s} {'p50 ms':>8s} {'tok/s':>8s} {'%bound':>7s} {'cacheGB':>8s} {'peakGB':>7s} "
          f"{'splits':>6s} {'graph':>5s} {'speedup':>7s}")
    speed = {r["layout"]: r["speedup"] for r in rows if r["op"] == "model_decode_speedup"}
    for r in rows:
        if r["op"] == "model_decode" and r["status"] == "ok":
            print(f"{r['layout']:14s} {r['batch']:5d} {r['p50_ms']:8.2f} {r['tokens_per_s']:8.0f} "
                  f"{r['pct_of_floor']:7.1f} {r['cache_gb']:8.1f} {r['mem_peak_gb']:7.1f} {r['decode_splits']:6d} "
                  f"{str(r['cuda_graph']):>5s} {speed.get(r['layout'], 1.0):7.2f}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
