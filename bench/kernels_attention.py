"""Attention kernels alone (no projections), the peers the mixer competes with: SDPA FlashAttention and cuDNN
backends and the flash-attn package when installed, apriel-15b heads (32 q / 8 kv, head dim 128), bf16.

    run(quick=False, ceilings=None) -> list[dict] rows (bench/rows.py format, suite "kernels")
- sdpa_prefill: causal, batch 1, L 1k..32k; TFLOP/s counts the causal half (4 b h d L^2 / 2), floor at
  the measured bf16 GEMM rate;
- sdpa_decode: one query token over a KV cache of L tokens (b16 L16k, b1 L32k, ...), GB/s of the KV read,
  floor at the measured copy bandwidth; CUDA-graph replays rotating over 2 caches so L2 holds none.
Reference figures (kernels.md, same machine): prefill flash 143 / 277 / 336 / 351 TFLOP/s at L 1k / 4k /
16k / 32k, cuDNN 241 / 507 / 581 / 549; decode b16 L16k 374 us flash, 366 us cuDNN; b1 L32k 73 us.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import timing
from .mixers import APRIEL_15B, ATTN_PROVIDERS, flash_attn_module, sdpa_backend
from .rows import add_rates, error_row, make_row, unavailable

SUITE = "kernels"


def _prefill_fn(provider: str, b: int, L: int):
    s = APRIEL_15B
    if provider == "flash-attn":
        fa = flash_attn_module()
        q = torch.randn(b, L, s.n_q, s.head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, L, s.n_kv, s.head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        return lambda: fa["func"](q, k, v, causal=True)
    q = torch.randn(b, s.n_q, L, s.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, s.n_kv, L, s.head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def call():
        with sdpa_backend(provider):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return call


def _decode_fn(provider: str, b: int, L: int):
    s = APRIEL_15B
    if provider == "flash-attn":
        fa = flash_attn_module()
        q = torch.randn(b, 1, s.n_q, s.head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, L, s.n_kv, s.head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        return lambda: fa["kvcache"](q, k, v)
    q = torch.randn(b, s.n_q, 1, s.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, s.n_kv, L, s.head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def call():
        with sdpa_backend(provider):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return call


def run(quick: bool = False, ceilings=None) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return [unavailable(SUITE, "sdpa", "torch", "no CUDA device")]
    s = APRIEL_15B
    rows: list[dict[str, Any]] = []
    providers = [p for p in ATTN_PROVIDERS if p != "flash-attn" or flash_attn_module() is not None]
    if "flash-attn" not in providers:
        rows.append(unavailable(SUITE, "sdpa_prefill", "flash-attn", "flash-attn package not installed (optional peer)"))
    prefill = (1024, 4096, 16384) if quick else (1024, 4096, 16384, 32768)
    decode = ((16, 16384), (1, 32768)) if quick else ((1, 4096), (1, 32768), (16, 4096), (16, 16384), (64, 16384))
    for p in providers:
        for L in prefill:
            fields = {"phase": "prefill", "batch": 1, "seqlen": L, "shape": f"b1 L{L}", "heads": "32q/8kv d128", "family": "attention"}
            try:
                stats = timing.time_auto_ms(_prefill_fn(p, 1, L))
            except Exception as error:  # noqa: BLE001
                rows.append(error_row(SUITE, "sdpa_prefill", p, error, **fields))
                continue
            flops = 4 * s.n_q * s.head_dim * L * L / 2
            floor = ceilings.floor_ms(flops=flops) if ceilings is not None else None
            rows.append(add_rates(make_row(SUITE, "sdpa_prefill", p, stats=stats, **fields), flops=flops, tokens=L,
                                  floor_ms=floor))
            torch.cuda.empty_cache()
        for b, L in decode:
            fields = {"phase": "decode", "batch": b, "seqlen": L, "shape": f"b{b} L{L}", "heads": "32q/8kv d128", "family": "attention"}
            try:
                stats = timing.time_graph_ms(timing.rotating([_decode_fn(p, b, L) for _ in range(2)]), per_graph=10)
            except Exception as error:  # noqa: BLE001
                rows.append(error_row(SUITE, "sdpa_decode", p, error, **fields))
                continue
            nbytes = b * L * s.kv_bytes_per_token()
            floor = ceilings.floor_ms(nbytes=nbytes) if ceilings is not None else None
            rows.append(add_rates(make_row(SUITE, "sdpa_decode", p, stats=stats, bytes=nbytes,
                                           note="CUDA graph replay, 2 rotating KV caches", **fields),
                                  nbytes=nbytes, tokens=b, floor_ms=floor))
            torch.cuda.empty_cache()
    return rows
