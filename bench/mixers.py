"""mixers suite: one attention layer vs one Mamba mixer layer of the same model shape, prefill and decode,
over context lengths 1k..128k (as memory allows) at batch 1 and 16 - and the context where the mixer wins.

    run(quick=False, ceilings=None) -> list[dict] rows (bench/rows.py format)
    crossovers(rows) -> list[dict]   one summary per (phase, batch, attention provider)

Layers (apriel-15b: hidden 5120, 32 q / 8 kv heads, head dim 128; mixer D 4096, X 1024, N 16, R 16, W 4),
random bf16 weights, each layer = everything between its input h (b, L, hidden) and its output:
- attention: qkv GEMM -> SDPA (causal, GQA) -> o GEMM. RoPE is left out (elementwise, same for any backend).
  Providers: "sdpa-flash" (torch SDPA, FlashAttention backend), "sdpa-cudnn" (cuDNN backend),
  "flash-attn" (the flash-attn package, when importable). Decode (one query token) writes the new k, v
  into a KV cache of the context length and attends over it.
- mixer ("apriel"): in_proj GEMM (to z, x, B, C) + dt_in_proj GEMM -> apriel_kernels.mixer_scan (prefill,
  final states kept for decode) or apriel_kernels.mixer_step (decode, fp32 state updated in place) ->
  out_proj GEMM.
Measurement: prefill by device events from a flushed L2 (timing.time_auto_ms); decode by CUDA-graph replay
(timing.time_graph_ms) of calls rotating over 2 copies of weights + caches, so one call never finds the
previous call's weights or KV cache in L2 (a real model reads each layer's weights once per step).
Rows carry floor_ms from the measured ceilings: GEMM + attention FLOPs at the bf16 GEMM rate, the scan at
max(exp2 rate, copy bandwidth), decode at copy bandwidth for the bytes it must read and write.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import profiling, timing
from .rows import add_rates, error_row, make_row, unavailable

SUITE = "mixers"
ATTN_PROVIDERS = ("sdpa-flash", "sdpa-cudnn", "flash-attn")
MIXER_PROVIDER = "apriel"
PRIMARY_ATTN = "sdpa-flash"  # "one FlashAttention layer" of the bar
DEVICE = "cuda"  # tests set "cpu" to run the suite's code on tiny shapes with the reference ops


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One layer of a preset model. Defaults: apriel-15b (mixer.md sections 1-2)."""

    hidden: int = 5120
    n_q: int = 32
    n_kv: int = 8
    head_dim: int = 128
    d_inner: int = 4096
    d_xb: int = 1024
    d_state: int = 16
    dt_rank: int = 16
    d_conv: int = 4

    @property
    def qkv_width(self) -> int:
        return (self.n_q + 2 * self.n_kv) * self.head_dim

    @property
    def zxbc_width(self) -> int:
        return 2 * self.d_inner + 2 * self.d_xb

    def attn_weight_bytes(self, elt: int = 2) -> int:
        return elt * (self.qkv_width * self.hidden + self.hidden * self.n_q * self.head_dim)

    def mixer_weight_bytes(self, elt: int = 2) -> int:
        gemm = self.hidden * (self.zxbc_width + self.dt_rank) + self.hidden * self.d_inner
        small = self.d_inner * (self.d_conv + 1 + self.dt_rank + 1)  # conv w+b, dt_proj w+b
        return elt * (gemm + small) + 4 * self.d_inner * (self.d_state + 1)  # A_log, D fp32

    def kv_bytes_per_token(self, elt: int = 2) -> int:
        return 2 * self.n_kv * self.head_dim * elt

    def mixer_state_bytes(self) -> int:
        return 4 * self.d_inner * self.d_state + 2 * self.d_xb * (self.d_conv - 1)


APRIEL_15B = LayerShape()


def _randn(*shape, scale: float, device=None, dtype=torch.bfloat16) -> torch.Tensor:
    return (torch.randn(*shape, device=device or DEVICE, dtype=torch.float32) * scale).to(dtype)


# ------------------------------------------------------------------------------------------- attention
def sdpa_backend(provider: str):
    """The backend context of an SDPA provider; "sdpa" = torch's own choice (the CPU fallback uses it)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if provider == "sdpa":
        return contextlib.nullcontext()
    return sdpa_kernel({"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[provider])


def flash_attn_module():
    """The flash-attn package's interface, or None when it is not installed (a peer, never a dependency)."""
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func, flash_attn_with_kvcache
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return {"func": flash_attn_func, "kvcache": flash_attn_with_kvcache}


class AttentionLayer:
    """qkv GEMM -> attention -> o GEMM with random weights. provider selects the attention implementation."""

    def __init__(self, shape: LayerShape, provider: str, device=None, dtype=torch.bfloat16):
        device = device or DEVICE
        self.s, self.provider = shape, provider
        self.w_qkv = _randn(shape.qkv_width, shape.hidden, scale=shape.hidden**-0.5, device=device, dtype=dtype)
        self.w_o = _randn(shape.hidden, shape.n_q * shape.head_dim, scale=(shape.n_q * shape.head_dim) ** -0.5,
                          device=device, dtype=dtype)
        if provider == "flash-attn":
            self.fa = flash_attn_module()
            if self.fa is None:
                raise RuntimeError("flash-attn is not installed")
        elif provider not in ("sdpa-flash", "sdpa-cudnn", "sdpa"):
            raise ValueError(f"provider: expected one of {(*ATTN_PROVIDERS, 'sdpa')}, got {provider!r}")

    def _split(self, qkv: torch.Tensor):
        s = self.s
        return qkv.split([s.n_q * s.head_dim, s.n_kv * s.head_dim, s.n_kv * s.head_dim], dim=-1)

    def prefill(self, h: torch.Tensor) -> torch.Tensor:
        """h: (b, L, hidden) -> (b, L, hidden), causal over L."""
        s = self.s
        b, L, _ = h.shape
        with profiling.layer_range("attention/qkv"):
            q, k, v = self._split(F.linear(h, self.w_qkv))
        with profiling.layer_range("attention/core"):
            if self.provider == "flash-attn":
                o = self.fa["func"](q.view(b, L, s.n_q, s.head_dim), k.view(b, L, s.n_kv, s.head_dim),
                                    v.view(b, L, s.n_kv, s.head_dim), causal=True)
                o = o.reshape(b, L, s.n_q * s.head_dim)
            else:
                # (b, L, h, d) views transposed to (b, h, L, d): no copy, last dim contiguous as SDPA wants.
                qh = q.view(b, L, s.n_q, s.head_dim).transpose(1, 2)
                kh = k.view(b, L, s.n_kv, s.head_dim).transpose(1, 2)
                vh = v.view(b, L, s.n_kv, s.head_dim).transpose(1, 2)
                with sdpa_backend(self.provider):
                    o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
                o = o.transpose(1, 2).reshape(b, L, s.n_q * s.head_dim)
        with profiling.layer_range("attention/o"):
            return F.linear(o, self.w_o)

    def new_cache(self, batch: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random (never zero) K and V caches of seqlen tokens: (b, kv, L, d) for SDPA, (b, L, kv, d) for flash-attn."""
        s = self.s
        shape = (batch, seqlen, s.n_kv, s.head_dim) if self.provider == "flash-attn" else (batch, s.n_kv, seqlen, s.head_dim)
        return (torch.randn(shape, device=self.w_o.device, dtype=self.w_o.dtype),
                torch.randn(shape, device=self.w_o.device, dtype=self.w_o.dtype))

    def decode(self, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               cache_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """h: (b, hidden), one new token per sequence at the last cache position -> (b, hidden)."""
        s = self.s
        b = h.shape[0]
        with profiling.layer_range("attention/qkv"):
            q, k, v = self._split(F.linear(h, self.w_qkv))
        with profiling.layer_range("attention/core"):
            if self.provider == "flash-attn":
                # writes k, v at cache_seqlens (= L - 1) and attends over L tokens
                o = self.fa["kvcache"](q.view(b, 1, s.n_q, s.head_dim), k_cache, v_cache,
                                       k=k.view(b, 1, s.n_kv, s.head_dim), v=v.view(b, 1, s.n_kv, s.head_dim),
                                       cache_seqlens=cache_seqlens)
            else:
                pos = k_cache.shape[2] - 1
                k_cache[:, :, pos].copy_(k.view(b, s.n_kv, s.head_dim))
                v_cache[:, :, pos].copy_(v.view(b, s.n_kv, s.head_dim))
                with sdpa_backend(self.provider):
                    o = F.scaled_dot_product_attention(q.view(b, s.n_q, 1, s.head_dim), k_cache, v_cache,
                                                       enable_gqa=True)
        with profiling.layer_range("attention/o"):
            return F.linear(o.reshape(b, s.n_q * s.head_dim), self.w_o)


# ------------------------------------------------------------------------------------------------ mixer
class MixerLayer:
    """in_proj + dt_in_proj GEMMs -> apriel_kernels mixer_scan / mixer_step -> out_proj GEMM (random weights,
    A_log and dt bias initialised as mixer.md section 5 so the recurrence is in its trained regime)."""

    def __init__(self, shape: LayerShape, device=None, dtype=torch.bfloat16):
        device = device or DEVICE
        s = self.s = shape
        self.w_in = _randn(s.zxbc_width, s.hidden, scale=s.hidden**-0.5, device=device, dtype=dtype)
        self.w_dt_in = _randn(s.dt_rank, s.hidden, scale=s.hidden**-0.5, device=device, dtype=dtype)
        self.w_out = _randn(s.hidden, s.d_inner, scale=s.d_inner**-0.5, device=device, dtype=dtype)
        self.conv_w = _randn(s.d_inner, s.d_conv, scale=s.d_conv**-0.5, device=device, dtype=dtype)
        self.conv_b = _randn(s.d_inner, scale=0.1, device=device, dtype=dtype)
        self.dt_w = ((torch.rand(s.d_inner, s.dt_rank, device=device) * 2 - 1) * s.dt_rank**-0.5).to(dtype)
        dt = torch.exp(torch.rand(s.d_inner, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_b = (dt + torch.log(-torch.expm1(-dt))).to(dtype)  # inverse softplus
        self.A_log = torch.log(torch.arange(1, s.d_state + 1, device=device, dtype=torch.float32)).repeat(s.d_inner, 1)
        self.D = torch.ones(s.d_inner, device=device, dtype=torch.float32)

    def _dims(self) -> dict[str, int]:
        return {"d_inner": self.s.d_inner, "d_xb": self.s.d_xb, "d_state": self.s.d_state}

    def prefill(self, h: torch.Tensor):
        """h: (b, L, hidden) -> (out (b, L, hidden), final ssm state, final conv state)."""
        import apriel_kernels

        with profiling.layer_range("mixer/in_proj"):
            zxbc = F.linear(h, self.w_in)
            dt_low = F.linear(h, self.w_dt_in)
        with profiling.layer_range("mixer/scan"):
            y, ssm, conv = apriel_kernels.mixer_scan(zxbc, dt_low, self.conv_w, self.conv_b, self.dt_w, self.dt_b,
                                                     self.A_log, self.D, return_final_states=True, **self._dims())
        with profiling.layer_range("mixer/out_proj"):
            return F.linear(y, self.w_out), ssm, conv

    def new_cache(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random (conv_state (b, X, W-1) bf16, ssm_state (b, D/N, N, N) fp32) of one sequence slot each."""
        s = self.s
        conv = torch.randn(batch, s.d_xb, s.d_conv - 1, device=self.w_in.device, dtype=self.w_in.dtype)
        ssm = torch.randn(batch, s.d_inner // s.d_state, s.d_state, s.d_state, device=self.w_in.device) * 0.1
        return conv, ssm

    def decode(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """h: (b, hidden) -> (b, hidden); the caches advance one token in place."""
        import apriel_kernels

        with profiling.layer_range("mixer/in_proj"):
            zxbc = F.linear(h, self.w_in)
            dt_low = F.linear(h, self.w_dt_in)
        with profiling.layer_range("mixer/step"):
            y = apriel_kernels.mixer_step(zxbc, dt_low, conv_state, ssm_state, None, self.conv_w, self.conv_b,
                                          self.dt_w, self.dt_b, self.A_log, self.D, **self._dims())
        with profiling.layer_range("mixer/out_proj"):
            return F.linear(y, self.w_out)


# ------------------------------------------------------------------------------------------------- work
def attention_work(s: LayerShape, phase: str, b: int, L: int) -> dict[str, float]:
    """FLOPs and bytes one attention layer must do (causal prefill counts half of QK^T and PV)."""
    if phase == "prefill":
        gemm = 2 * b * L * s.hidden * (s.qkv_width + s.n_q * s.head_dim)
        attn = 4 * b * s.n_q * s.head_dim * L * L / 2
        return {"flops": gemm + attn, "nbytes": s.attn_weight_bytes() + 2 * b * L * (2 * s.hidden + s.qkv_width + 2 * s.n_q * s.head_dim)}
    gemm = 2 * b * s.hidden * (s.qkv_width + s.n_q * s.head_dim)
    attn = 4 * b * s.n_q * s.head_dim * L
    return {"flops": gemm + attn, "nbytes": s.attn_weight_bytes() + b * L * s.kv_bytes_per_token()}


def mixer_work(s: LayerShape, phase: str, b: int, L: int) -> dict[str, float]:
    gemm_width = s.zxbc_width + s.dt_rank + s.d_inner
    if phase == "prefill":
        scan_bytes = 2 * b * L * (s.zxbc_width + s.dt_rank + s.d_inner)  # read zxbc, dt_low; write y
        return {"gemm_flops": 2 * b * L * s.hidden * gemm_width, "exp2": b * L * s.d_inner * s.d_state,
                "scan_bytes": scan_bytes, "nbytes": s.mixer_weight_bytes() + scan_bytes + 4 * b * L * s.hidden}
    state_rw = 2 * b * s.mixer_state_bytes()
    return {"gemm_flops": 2 * b * s.hidden * gemm_width, "exp2": b * s.d_inner * s.d_state,
            "nbytes": s.mixer_weight_bytes() + state_rw + 2 * b * (s.zxbc_width + s.d_inner + 2 * s.hidden)}


def floor_ms(ceil, s: LayerShape, layer: str, phase: str, b: int, L: int) -> float | None:
    """Time at the measured ceilings: kernels run one after another, so their floors add."""
    if ceil is None:
        return None
    if layer == "attention":
        w = attention_work(s, phase, b, L)
        if phase == "prefill":
            return ceil.floor_ms(flops=w["flops"])
        return ceil.floor_ms(flops=w["flops"], nbytes=w["nbytes"])
    w = mixer_work(s, phase, b, L)
    if phase == "prefill":
        return ceil.floor_ms(flops=w["gemm_flops"]) + ceil.floor_ms(nbytes=w["scan_bytes"], exp2=w["exp2"])
    return ceil.floor_ms(nbytes=w["nbytes"], flops=w["gemm_flops"], exp2=w["exp2"])


def peak_bytes_estimate(s: LayerShape, layer: str, phase: str, b: int, L: int, sets: int = 1) -> int:
    """Generous device-memory estimate of one measurement (activations + caches + weights), to skip what
    cannot fit instead of dying in the middle of a suite."""
    if phase == "prefill":
        width = s.qkv_width + 2 * s.n_q * s.head_dim if layer == "attention" else s.zxbc_width + s.dt_rank + s.d_inner + 4 * s.d_inner
        return int(1.5 * 2 * b * L * (2 * s.hidden + width)) + 2 * s.mixer_weight_bytes()
    per_set = (s.attn_weight_bytes() + b * L * s.kv_bytes_per_token()) if layer == "attention" else \
        (s.mixer_weight_bytes() + b * s.mixer_state_bytes())
    return int(sets * per_set * 1.1) + 2 * b * (s.hidden + s.zxbc_width) * 64


def contexts(quick: bool, phase: str, batch: int) -> list[int]:
    """1k..128k; decode also at 256 and 512 (cheap, and at batch 16 the decode crossover is near 1k)."""
    top = 1 << 17  # 128k
    if phase == "prefill" and batch > 1:
        top = 1 << 14 if quick else 1 << 15  # attention prefill time grows with b * L^2: keep the suite short
    if quick and phase == "prefill":
        top = min(top, 1 << 16)
    low = 8 if phase == "decode" else 10
    return [1 << k for k in range(low, 18) if (1 << k) <= top]


def _fits(nbytes: int) -> bool:
    if DEVICE == "cpu":
        return True
    free, _ = torch.cuda.mem_get_info()
    return nbytes < 0.8 * free


# ----------------------------------------------------------------------------------------------- suite
MIXER_KERNELS = {"prefill": ("mixer_scan_fwd",), "decode": ("mixer_step",), None: ("mixer_scan_fwd", "mixer_step")}


def _availability(provider: str, phase: str | None = None) -> str | None:
    """None when the provider can run here (in that phase), else why not."""
    if provider == "flash-attn" and flash_attn_module() is None:
        return "flash-attn package not installed (optional peer)"
    if provider == MIXER_PROVIDER and DEVICE != "cpu":  # on CPU the ops run their reference
        from apriel_kernels._ext import has_kernel, load_error

        missing = [k for k in MIXER_KERNELS[phase] if not has_kernel(k)]
        if missing:
            return f"apriel_kernels extension lacks {missing} ({load_error() or 'not built into this extension'})"
    return None


def _measure_prefill(layer, b: int, L: int, hidden: int) -> dict[str, float]:
    h = torch.randn(b, L, hidden, device=DEVICE, dtype=layer.w_out.dtype if hasattr(layer, "w_out") else layer.w_o.dtype)
    fn = (lambda: layer.prefill(h))
    return timing.time_auto_ms(fn)


def _measure_decode(make_call: Callable[[], Callable[[], Any]], sets: int) -> dict[str, float]:
    fns = [make_call() for _ in range(sets)]
    return timing.time_graph_ms(timing.rotating(fns), per_graph=10)  # 10 calls per replay: launch cost amortised


def run(quick: bool = False, ceilings=None, shape: LayerShape = APRIEL_15B, batches=(1, 16),
        providers: tuple[str, ...] | None = None, seqlens: tuple[int, ...] | None = None,
        deadline: float | None = None) -> list[dict[str, Any]]:
    """All rows of the suite; a failing measurement becomes an "error" row and the suite goes on.
    seqlens overrides the context lengths of every (phase, batch) (tests use tiny ones); past deadline
    (time.monotonic()) the remaining measurements become "skipped" rows."""
    rows: list[dict[str, Any]] = []
    providers = providers or (*ATTN_PROVIDERS, MIXER_PROVIDER)
    live = {}
    for phase in ("prefill", "decode"):
        reasons = {p: _availability(p, phase) for p in providers}
        for p, why in reasons.items():
            if why:
                rows.append(unavailable(SUITE, "mixer_layer" if p == MIXER_PROVIDER else "attention_layer", p, why,
                                        phase=phase))
        live[phase] = [p for p in providers if not reasons[p]]
    # shortest contexts first across every (phase, batch): a spent time budget drops the longest contexts,
    # never a whole phase or batch (the crossovers sit at a few thousand tokens)
    plan = sorted(((L, phase, b) for phase in ("prefill", "decode") for b in batches
                   for L in (seqlens or contexts(quick, phase, b))), key=lambda x: (x[0], x[1] != "prefill", x[2]))
    for L, phase, b in plan:
        for p in live[phase]:
            if deadline is not None and time.monotonic() > deadline:
                rows.append(make_row(SUITE, "mixer_layer" if p == MIXER_PROVIDER else "attention_layer", p,
                                     status="skipped", note="suite time budget spent", phase=phase, batch=b,
                                     seqlen=L, shape=f"b{b} L{L}"))
                continue
            rows.append(_one(shape, p, phase, b, L, ceilings))
    return rows


def _one(s: LayerShape, provider: str, phase: str, b: int, L: int, ceil) -> dict[str, Any]:
    kind = "mixer" if provider == MIXER_PROVIDER else "attention"
    op = f"{kind}_layer"
    if DEVICE != "cpu":
        torch.cuda.empty_cache()  # so mem_get_info sees what the previous measurement left cached
    fields = {"phase": phase, "batch": b, "seqlen": L, "shape": f"b{b} L{L}"}
    sets = 2
    need = peak_bytes_estimate(s, kind, phase, b, L, sets)
    if phase == "decode" and not _fits(need):
        sets = 1
        need = peak_bytes_estimate(s, kind, phase, b, L, sets)
    if not _fits(need):
        return make_row(SUITE, op, provider, status="skipped", note=f"needs ~{need / 2**30:.1f} GiB", **fields)
    try:
        with profiling.nvtx(f"{SUITE}/{phase}/L={L}/b={b}/{provider}"):
            if phase == "prefill":
                layer = MixerLayer(s) if kind == "mixer" else AttentionLayer(s, provider)
                stats = _measure_prefill(layer, b, L, s.hidden)
                note = None
            else:
                stats, note = _measure_decode_layer(s, kind, provider, b, L, sets)
    except Exception as error:  # noqa: BLE001 - one failure is a row, not the end of the suite
        torch.cuda.empty_cache()
        return error_row(SUITE, op, provider, error, **fields)
    row = make_row(SUITE, op, provider, stats=stats, note=note, **fields)
    work = attention_work(s, phase, b, L) if kind == "attention" else mixer_work(s, phase, b, L)
    flops = work.get("flops", work.get("gemm_flops"))
    tokens = b * L if phase == "prefill" else b
    add_rates(row, flops=flops if phase == "prefill" else None, nbytes=work["nbytes"] if phase == "decode" else None,
              tokens=tokens, floor_ms=floor_ms(ceil, s, kind, phase, b, L))
    return row


def _measure_decode_layer(s: LayerShape, kind: str, provider: str, b: int, L: int, sets: int):
    def make_call():
        h = torch.randn(b, s.hidden, device=DEVICE, dtype=torch.bfloat16)
        if kind == "mixer":
            layer = MixerLayer(s)
            conv, ssm = layer.new_cache(b)
            return lambda: layer.decode(h, conv, ssm)
        layer = AttentionLayer(s, provider)
        k, v = layer.new_cache(b, L)
        seqlens = torch.full((b,), L - 1, device=DEVICE, dtype=torch.int32) if provider == "flash-attn" else None
        return lambda: layer.decode(h, k, v, seqlens)

    note = f"CUDA graph replay, {sets} rotating copies of weights+caches"
    return _measure_decode(make_call, sets), note


# ------------------------------------------------------------------------------------------- crossover
def _p50(rows, op: str, provider: str | None, phase: str, b: int) -> dict[int, float]:
    return {int(r["seqlen"]): float(r["p50_ms"]) for r in rows
            if r.get("suite") == SUITE and r.get("op") == op and (provider is None or r.get("provider") == provider)
            and r.get("phase") == phase and r.get("batch") == b and r.get("status") == "ok" and r.get("p50_ms")}


def crossover(attn: dict[int, float], mixer: dict[int, float]) -> dict[str, Any]:
    """Smallest measured L from which the mixer is faster at every larger measured L, and the L where
    attention/mixer time crosses 1 (log2-linear interpolation between the two measured L around it)."""
    common = sorted(set(attn) & set(mixer))
    if not common:
        return {"crossover_L": None, "interp_L": None, "verdict": "no common measurements"}
    wins = [mixer[L] < attn[L] for L in common]
    first = None
    for i in range(len(common)):
        if all(wins[i:]):
            first = i
            break
    if first is None:
        return {"crossover_L": None, "interp_L": None,
                "verdict": f"attention faster up to the largest measured L={common[-1]}"}
    if first == 0:
        return {"crossover_L": common[0], "interp_L": None,
                "verdict": f"mixer faster at every measured L (from {common[0]})"}
    lo, hi = common[first - 1], common[first]
    r_lo, r_hi = math.log(attn[lo] / mixer[lo]), math.log(attn[hi] / mixer[hi])
    frac = r_lo / (r_lo - r_hi) if r_lo != r_hi else 1.0
    interp = 2 ** (math.log2(lo) + frac * (math.log2(hi) - math.log2(lo)))
    return {"crossover_L": hi, "interp_L": round(interp), "verdict": f"mixer faster from L~{round(interp)} (measured at {hi})"}


def attention_providers(rows: list[dict[str, Any]]) -> list[str]:
    seen = []
    for r in rows:
        if r.get("suite") == SUITE and r.get("op") == "attention_layer" and r.get("status") == "ok" and r["provider"] not in seen:
            seen.append(r["provider"])
    return seen


def crossovers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (phase, batch, attention provider), plus vs the fastest attention at each L."""
    out = []
    batches = sorted({r["batch"] for r in rows if r.get("suite") == SUITE and r.get("batch") is not None})
    providers = attention_providers(rows)
    for phase in ("prefill", "decode"):
        for b in batches:
            mixer = _p50(rows, "mixer_layer", None, phase, b)
            if not mixer:
                continue
            per = {p: _p50(rows, "attention_layer", p, phase, b) for p in providers}
            per = {p: v for p, v in per.items() if v}
            if len(per) > 1:
                ls = set().union(*per.values())
                per["best-attention"] = {L: min(v[L] for v in per.values() if L in v) for L in ls}
            for p, attn in per.items():
                out.append({"phase": phase, "batch": b, "vs": p, **crossover(attn, mixer)})
    return out


def crossover_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The crossover summaries as rows (saved with the run)."""
    return [make_row(SUITE, "crossover", "summary", phase=c["phase"], batch=c["batch"], vs=c["vs"],
                     crossover_L=c["crossover_L"], interp_L=c["interp_L"], note=c["verdict"],
                     shape=f"b{c['batch']}") for c in crossovers(rows)]


def profile_targets(shape: LayerShape = APRIEL_15B) -> list[tuple[str, Callable[[], Any]]]:
    """A few representative calls for the torch.profiler fallback (--profile / --nsys without nsys)."""
    targets = []
    h = torch.randn(1, 16384, shape.hidden, device=DEVICE, dtype=torch.bfloat16)
    for p in ("sdpa-flash", MIXER_PROVIDER):
        if _availability(p, "prefill") is None:
            layer = MixerLayer(shape) if p == MIXER_PROVIDER else AttentionLayer(shape, p)
            targets.append((f"mixers_prefill_b1_L16384_{p}", (lambda layer=layer: layer.prefill(h))))
    return targets
