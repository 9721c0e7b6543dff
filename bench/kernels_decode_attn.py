"""One-token decode attention over a 16k KV cache at the engine's batch sizes: apriel_kernels.decode_attention
(split-K Triton) against torch SDPA with the engine's boolean mask (the path it replaces).

    python -m bench.kernels_decode_attn [--out FILE] [--quick]

apriel-15b heads (8 kv heads x 4 query heads, head dim 128), bf16, cache capacity 16,448 keys with 16,385
valid (the engine's decode at 16k context), batch 15 / 36 / 71 (the e2e bench's largest batches for
all-attention / H1-30 / H1-40). Bytes = K + V of the valid keys; floor at the measured copy bandwidth.
CUDA-graph replays (20 calls per graph, a layer's worth of cache each: no L2 reuse at these sizes).
Providers: sdpa (torch picks the backend: cuDNN at these shapes), fused (the kernel's own split choice),
fused[s=S,bn=N,w=W,st=T] (a sweep of splits and tile configurations, to set the defaults).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import timing
from .rows import add_rates, error_row, make_row, suite_main

SUITE = "kernels"
OP = "decode_attention"
KV, G, D = 8, 4, 128
CAPACITY, CONTEXT = 16448, 16385


def _case(b: int):
    gen = torch.Generator(device="cuda").manual_seed(b)
    q = torch.randn(b, KV, G, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    keys = torch.randn(b, KV, CAPACITY, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    values = torch.randn(b, KV, CAPACITY, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    valid = torch.zeros(b, CAPACITY, dtype=torch.bool, device="cuda")
    valid[:, :CONTEXT] = True
    kv_stop = torch.full((b,), CONTEXT, dtype=torch.int64, device="cuda")
    return q, keys, values, valid, kv_stop


def _fused_config_fn(q, keys, values, valid, kv_stop, splits, block_n, warps, stages):
    from apriel_kernels import _triton_decode as td

    valid_u8 = valid.view(torch.uint8)
    out = torch.empty_like(q)

    def call():
        op, lse = td.partials(q, keys, values, valid_u8, kv_stop, None, D ** -0.5, splits, block_n, warps, stages)
        td.merge(op, lse, out)
        return out

    return call


def run(quick: bool = False, ceilings=None) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return [make_row(SUITE, OP, "all", status="not available", note="no CUDA device")]
    from apriel_kernels import _triton_decode as td
    from apriel_kernels.decode_attention import decode_attention

    copy_bw = timing.measure_copy_bandwidth()
    rows: list[dict[str, Any]] = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    batches = (36,) if quick else (15, 36, 71)
    configs = [(64, 4, 3)] if quick else [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (32, 4, 4)]
    for b in batches:
        q, keys, values, valid, kv_stop = _case(b)
        nbytes = b * KV * CONTEXT * D * 2 * 2
        floor_ms = nbytes / copy_bw * 1e3
        shape = f"b{b} kv{KV} g{G} d{D} ctx{CONTEXT}"
        mask = valid[:, None, None, :]
        candidates = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=D ** -0.5),
            "fused": lambda: decode_attention(q, keys, values, valid, kv_stop=kv_stop),
        }
        auto = td.pick_splits(b * KV, CAPACITY, sms)
        for bn, w, st in configs:
            for s in ((auto,) if quick else sorted({1, 2, 4, 8, 16, 32, auto})):
                candidates[f"fused[s={s},bn={bn},w={w},st={st}]"] = _fused_config_fn(q, keys, values, valid, kv_stop,
                                                                                     s, bn, w, st)
        ref = None
        for provider, fn in candidates.items():
            try:
                out = fn()
                if ref is None:
                    ref = out.float()
                err = (out.float() - ref).abs().max().item()
                stats = timing.time_graph_ms(fn, rep_ms=60)
                row = make_row(SUITE, OP, provider, stats=stats, shape=shape, batch=b, max_err_vs_sdpa=err,
                               auto_splits=auto, copy_gb_s=copy_bw / 1e9)
                rows.append(add_rates(row, nbytes=nbytes, floor_ms=floor_ms))
            except Exception as e:  # noqa: BLE001 - one failing config must not cost the others
                rows.append(error_row(SUITE, OP, provider, e, shape=shape, batch=b))
        del q, keys, values, valid, kv_stop, candidates
        torch.cuda.empty_cache()
    return rows


def _format(r: dict[str, Any]) -> str:
    return (f"{r['shape']:<28} {r['provider']:<30} {r['p50_ms'] * 1e3:9.1f} us {r.get('gb_per_s', 0):8.0f} GB/s "
            f"{r.get('pct_of_floor', 0):6.1f}% err {r.get('max_err_vs_sdpa', 0):.2e}")


def main(argv=None) -> int:
    return suite_main(__doc__.split("\n")[0], run, _format, f"{'shape':<28} {'provider':<30} {'p50':>12} "
                      f"{'rate':>13} {'%copy':>7}", argv)


if __name__ == "__main__":
    raise SystemExit(main())
