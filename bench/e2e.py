"""e2e suite: whole-model prefill (time to first token) and decode throughput, transformer vs hybrid layouts.

    run(quick=False, ceilings=None, layers=None) -> list[dict] rows

Two sources of rows:
1. provider "bench-stack": a bench-local stack of the preset's real layer shapes (apriel-15b: 50 layers,
   hidden 5120, MLP 14336, vocab 131072; random bf16 weights allocated on the GPU) built from the mixers
   suite's layers + RMSNorm + SwiGLU MLP + lm_head. Every layer's weights are distinct tensors, so a
   decode step reads all of them from HBM like a real model. Left out: embedding lookup, RoPE, sampling
   (small elementwise work). Layouts: "all-attention" (50 t), "H1-30" (30 m2 + 20 t), "H1-40" (40 m2 + 10 t);
   the positions of the mixers do not change the time, only their count. Measured:
   - prefill/TTFT at batch 1 over prompt lengths (one forward over the prompt, logits of the last token);
   - decode tokens/s (one token per sequence per step, whole step CUDA-graph replayed) vs batch at 16k
     context and vs context at batch 16; memory per sequence (KV + mixer state bytes), the largest batch
     whose caches fit next to the weights, and decode at that batch;
   - % of the bandwidth bound: (weights + caches read/written per step) / measured copy bandwidth.
2. provider "apriel_model-engine": bench/e2e_decode.py (the model's own engine; owned by the model
   engineer) run in a subprocess (it needs the whole GPU), its rows folded in; "not available" when absent.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import mixers as _mixers
from . import profiling, timing
from .mixers import APRIEL_15B, AttentionLayer, LayerShape, MixerLayer, _randn
from .rows import add_rates, error_row, make_row, normalize, unavailable

SUITE = "e2e"
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str = "apriel-15b"
    layer: LayerShape = APRIEL_15B
    n_layers: int = 50
    intermediate: int = 14336
    vocab: int = 131072

    def layouts(self) -> dict[str, list[str]]:
        """transformer and the Apriel-H1 mixer counts (30 and 40 of 50), scaled when n_layers is reduced."""
        n = self.n_layers
        out = {"all-attention": ["t"] * n}
        for name, m in (("H1-30", 30), ("H1-40", 40)):
            k = round(m * n / 50)
            out[name] = spread(n, k)
        return out

    def weight_bytes(self, layout: list[str]) -> int:
        s = self.layer
        mlp = 2 * 3 * s.hidden * self.intermediate
        mixers = sum(s.mixer_weight_bytes() if c == "m2" else s.attn_weight_bytes() for c in layout)
        return len(layout) * (mlp + 4 * s.hidden) + mixers + 2 * self.vocab * s.hidden * 2  # + embed, lm_head

    def seq_bytes(self, layout: list[str], context: int) -> int:
        """Cache bytes of one sequence: KV of attention layers grows with context, mixer state does not."""
        s = self.layer
        return sum(context * s.kv_bytes_per_token() if c == "t" else s.mixer_state_bytes() for c in layout)


APRIEL_15B_MODEL = ModelShape()


def spread(n_layers: int, n_mixers: int) -> list[str]:
    """A deterministic layout with n_mixers "m2" spread evenly (timing depends on counts only)."""
    layout = ["t"] * n_layers
    for i in range(n_mixers):
        layout[int((i + 0.5) * n_layers / n_mixers)] = "m2"
    return layout


# ------------------------------------------------------------------------------------------------ stack
class Stack:
    """Pre-norm decoder stack: x += mixer(norm(x)); x += mlp(norm(x)); logits = lm_head(norm(x))."""

    def __init__(self, model: ModelShape, layout: list[str], device=None, dtype=torch.bfloat16):
        device = device or _mixers.DEVICE
        s, self.model, self.layout = model.layer, model, layout
        self.mixers = [MixerLayer(s) if c == "m2" else AttentionLayer(s, "sdpa-flash") for c in layout]
        self.norms = [torch.ones(2, s.hidden, device=device, dtype=dtype) for _ in layout]
        self.w_gate_up = [_randn(2 * model.intermediate, s.hidden, scale=s.hidden**-0.5) for _ in layout]
        self.w_down = [_randn(s.hidden, model.intermediate, scale=model.intermediate**-0.5) for _ in layout]
        self.final_norm = torch.ones(s.hidden, device=device, dtype=dtype)
        self.lm_head = _randn(model.vocab, s.hidden, scale=s.hidden**-0.5)

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w_gate_up[i]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w_down[i])

    def _norm(self, x, w):
        return F.rms_norm(x, (x.shape[-1],), w, eps=1e-5)

    def prefill(self, h: torch.Tensor) -> torch.Tensor:
        """h: (b, L, hidden) embeddings -> logits of the last position (b, vocab)."""
        x = h
        for i, (code, mixer) in enumerate(zip(self.layout, self.mixers)):
            with profiling.layer_range(f"layer{i:02d}/{code}"):
                out = mixer.prefill(self._norm(x, self.norms[i][0]))
                x = x + (out[0] if code == "m2" else out)
                x = x + self._mlp(i, self._norm(x, self.norms[i][1]))
        return F.linear(self._norm(x[:, -1], self.final_norm), self.lm_head)

    def new_caches(self, batch: int, context: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [m.new_cache(batch) if c == "m2" else m.new_cache(batch, context) for c, m in zip(self.layout, self.mixers)]

    def decode(self, h: torch.Tensor, caches) -> torch.Tensor:
        """h: (b, hidden), one token per sequence -> logits (b, vocab); caches advance in place."""
        x = h
        for i, (code, mixer) in enumerate(zip(self.layout, self.mixers)):
            with profiling.layer_range(f"layer{i:02d}/{code}"):
                out = mixer.decode(self._norm(x, self.norms[i][0]), *caches[i])
                x = x + out
                x = x + self._mlp(i, self._norm(x, self.norms[i][1]))
        return F.linear(self._norm(x, self.final_norm), self.lm_head)


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0]


def _sync() -> None:
    if _mixers.DEVICE != "cpu":
        torch.cuda.synchronize()


def plan(quick: bool) -> dict[str, Any]:
    """What the stack measures: prefill prompt lengths (batch 1), the decode context of the batch sweep,
    the batch sweep, the context sweep (at batch 16 or the max batch when smaller)."""
    return {
        "prefill": (1024, 4096, 16384) if quick else (1024, 4096, 16384, 32768),
        "context": 16384,
        "batches": (1, 16) if quick else (1, 4, 16, 32, 64, 128),
        "contexts": (4096, 65536) if quick else (1024, 4096, 32768, 65536),
        "reserve": 3 * GiB,  # graph pool, activations of a step, cuBLAS workspaces
    }


def _step_bytes(model: ModelShape, layout: list[str], batch: int, context: int) -> int:
    """Bytes a decode step must move: every weight once, every KV cache read, every mixer state read + written."""
    s = model.layer
    state_extra = sum(s.mixer_state_bytes() for c in layout if c == "m2")  # written back as well as read
    return model.weight_bytes(layout) - model.vocab * s.hidden * 2 + batch * (model.seq_bytes(layout, context) + state_extra)


def _late(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def _prefill_floor_ms(model: ModelShape, layout: list[str], L: int, ceil) -> float | None:
    """Time of a batch-1 prefill at the measured ceilings: every layer's floor (mixers suite) + its MLP GEMMs
    + the lm_head row of the last token; the kernels run one after another, so the floors add."""
    if ceil is None:
        return None
    s = model.layer
    mlp = ceil.floor_ms(flops=2 * L * s.hidden * 3 * model.intermediate)
    layers = sum(_mixers.floor_ms(ceil, s, "mixer" if c == "m2" else "attention", "prefill", 1, L) for c in layout)
    return layers + len(layout) * mlp + ceil.floor_ms(flops=2 * s.hidden * model.vocab)


def _stack_rows(model: ModelShape, name: str, layout: list[str], quick: bool, ceil,
                skip: dict[str, str] | None = None, deadline: float | None = None) -> list[dict[str, Any]]:
    """Rows of one layout; skip maps a phase ("prefill"/"decode") to why it cannot run (a missing kernel);
    past deadline the remaining measurements become "skipped" rows."""
    rows: list[dict[str, Any]] = []
    skip = skip or {}
    base = {"layout": name, "n_layers": len(layout), "n_mixers": layout.count("m2"), "provider_detail": "bench-local stack, random bf16 weights"}
    s = model.layer
    stack = Stack(model, layout)
    _sync()
    todo = plan(quick)
    # ---- memory per sequence and the largest batch that fits at the decode context
    ctx = todo["context"]
    per_seq = model.seq_bytes(layout, ctx)
    reserve = todo["reserve"]
    max_batch = max(0, int((_free_bytes() - reserve) // per_seq))
    rows.append(make_row(SUITE, "memory_per_sequence", "bench-stack", **base, seqlen=ctx, shape=f"L{ctx}",
                         mib_per_seq=per_seq / 2**20, weights_gib=model.weight_bytes(layout) / GiB, max_batch=max_batch,
                         note=f"caches: KV of {layout.count('t')} attention layers + state of {layout.count('m2')} mixers; "
                              f"max batch = (free after weights - {reserve / GiB:g} GiB) / per-sequence bytes"))
    # ---- what to measure, most important first (a spent time budget drops the tail): decode at the max
    # batch, prefill (TTFT) at batch 1, then decode vs batch at ctx and vs context at batch 16
    decode = [(b, ctx) for b in todo["batches"] if b < max_batch]
    b_ctx = min(16, max_batch) if max_batch else 0
    decode += [(b_ctx, L) for L in todo["contexts"]
               if b_ctx and L != ctx and b_ctx * model.seq_bytes(layout, L) < _free_bytes() - reserve]
    tasks = [("decode", max_batch, ctx)] if max_batch else []
    tasks += [("prefill", 1, L) for L in todo["prefill"]] + [("decode", b, L) for b, L in decode]
    for phase in ("prefill", "decode"):
        if phase in skip:
            rows.append(unavailable(SUITE, f"model_{phase}", "bench-stack", skip[phase], **base, phase=phase))
    for phase, b, L in tasks:
        if phase in skip:
            continue
        op = f"model_{phase}"
        fields = {**base, "phase": phase, "batch": b, "seqlen": L, "shape": f"b{b} L{L}"}
        if _late(deadline):
            rows.append(make_row(SUITE, op, "bench-stack", status="skipped", note="suite time budget spent", **fields))
            continue
        if phase == "decode":
            rows.append(_decode_row(model, stack, name, base, b, L, ceil, is_max=(b == max_batch and L == ctx)))
            continue
        try:
            with profiling.nvtx(f"e2e/{name}/prefill/L={L}"):
                h = torch.randn(1, L, s.hidden, device=_mixers.DEVICE, dtype=torch.bfloat16)
                stats = timing.time_long_ms(lambda st=stack, x=h: st.prefill(x), budget_ms=800 if quick else 2000)
                del h
            row = make_row(SUITE, op, "bench-stack", stats=stats, ttft_ms=stats["p50"],
                           note="one forward over the prompt, logits of the last token", **fields)
            rows.append(add_rates(row, tokens=L, floor_ms=_prefill_floor_ms(model, layout, L, ceil)))
        except Exception as error:  # noqa: BLE001
            rows.append(error_row(SUITE, op, "bench-stack", error, **fields))
        torch.cuda.empty_cache()
    del stack
    torch.cuda.empty_cache()
    return rows


def _decode_row(model, stack, name, base, b, L, ceil, is_max: bool) -> dict[str, Any]:
    s = model.layer
    fields = {**base, "phase": "decode", "batch": b, "seqlen": L, "shape": f"b{b} L{L}", "at_max_batch": is_max or None}
    try:
        with profiling.nvtx(f"e2e/{name}/decode/step/b={b}/L={L}"):
            caches = stack.new_caches(b, L)
            h = torch.randn(b, s.hidden, device=_mixers.DEVICE, dtype=torch.bfloat16)
            stats = timing.time_graph_ms(lambda x=h, c=caches: stack.decode(x, c), warmup_ms=20, rep_ms=150, per_graph=2)
            del caches, h
    except Exception as error:  # noqa: BLE001
        torch.cuda.empty_cache()
        return error_row(SUITE, "model_decode", "bench-stack", error, **fields)
    torch.cuda.empty_cache()
    row = make_row(SUITE, "model_decode", "bench-stack", stats=stats, note="whole step CUDA-graph replayed", **fields)
    nbytes = _step_bytes(model, stack.layout, b, L)
    floor = ceil.floor_ms(nbytes=nbytes) if ceil is not None else None
    return add_rates(row, nbytes=nbytes, tokens=b, floor_ms=floor)


# ------------------------------------------------------------------------------------- e2e_decode.py
def _e2e_decode_path() -> Path:
    return Path(__file__).resolve().parent / "e2e_decode.py"


def engine_rows(quick: bool, timeout_s: int | None = None) -> list[dict[str, Any]]:
    """Rows of bench/e2e_decode.py run in a subprocess (it needs the whole GPU); "not available" if absent."""
    path = _e2e_decode_path()
    if not path.exists() or importlib.util.find_spec("bench.e2e_decode") is None:
        return [unavailable(SUITE, "model_decode", "apriel_model-engine", "bench/e2e_decode.py is not in this checkout yet")]
    root = path.parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    default = 200 if quick else 360
    timeout_s = min(timeout_s, default) if timeout_s else default
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "e2e_decode.json"
        cmd = [sys.executable, "-m", "bench.e2e_decode", "--out", str(out)]
        if quick and "--quick" in path.read_text():
            cmd.append("--quick")
        problem = None
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
            sys.stdout.write(proc.stdout[-3000:])
            if proc.returncode != 0:
                problem = f"bench/e2e_decode.py exited {proc.returncode}: {proc.stderr[-400:]}"
        except subprocess.TimeoutExpired:
            problem = f"bench/e2e_decode.py ran past {timeout_s} s"
        # the script rewrites its file after every layout: keep what a cut-short run measured
        data = json.loads(out.read_text()) if out.exists() else []
    raw = data["rows"] if isinstance(data, dict) and "rows" in data else data if isinstance(data, list) else [data]
    rows = []
    for r in raw:
        r = normalize({"provider": "apriel_model-engine", **r}, SUITE)
        r["suite"] = SUITE
        if r.get("seqlen") is None and r.get("context") is not None:
            r["seqlen"] = r["context"]
        rows.append(r)
    if problem:
        rows.append(make_row(SUITE, "model_decode", "apriel_model-engine", status="error", note=problem))
    return rows


# ----------------------------------------------------------------------------------------------- suite
PARTS = ("stack", "engine")


def run(quick: bool = False, ceilings=None, layers: int | None = None, engine: bool = True,
        model: ModelShape = APRIEL_15B_MODEL, deadline: float | None = None, stack: bool = True) -> list[dict[str, Any]]:
    """stack: the bench-local stack rows; engine: bench/e2e_decode.py's rows (the CLI runs them as two
    units, each in its own process, so the engine gets a GPU this process no longer holds)."""
    model = dataclasses.replace(model, n_layers=layers) if layers else model
    rows: list[dict[str, Any]] = []
    from .mixers import _availability

    layouts = list(model.layouts().items()) if stack else []
    for i, (name, layout) in enumerate(layouts):
        # each layout gets an equal share of the time left, so a spent budget never drops a whole layout
        sub = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / (len(layouts) - i)
        skip = {}
        if "m2" in layout:
            skip = {ph: why for ph in ("prefill", "decode") if (why := _availability("apriel", ph))}
        if len(skip) == 2:
            rows.append(unavailable(SUITE, "model", "bench-stack", skip["decode"], layout=name))
            continue
        if model.weight_bytes(layout) > _free_bytes() - plan(quick)["reserve"]:
            rows.append(make_row(SUITE, "model_decode", "bench-stack", status="skipped", layout=name,
                                 note=f"weights {model.weight_bytes(layout) / GiB:.1f} GiB do not fit; rerun with --e2e-layers"))
            continue
        try:
            rows.extend(_stack_rows(model, name, layout, quick, ceilings, skip, sub))
        except Exception as error:  # noqa: BLE001 - one layout failing leaves the others
            rows.append(error_row(SUITE, "model", "bench-stack", error, layout=name))
        torch.cuda.empty_cache()
    rows.extend(ratio_rows(rows))
    if engine:
        left = None if deadline is None else int(deadline - time.monotonic())
        if left is not None and left < 30:
            rows.append(make_row(SUITE, "model_decode", "apriel_model-engine", status="skipped",
                                 note="suite time budget spent before bench/e2e_decode.py"))
        else:
            rows.extend(engine_rows(quick, timeout_s=left))
    return rows


def ratio_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hybrid over transformer decode tokens/s at the same (batch, context), and at each one's max batch."""
    dec = [r for r in rows if r.get("op") == "model_decode" and r.get("status") == "ok" and r.get("tokens_per_s")]
    base = {(r["batch"], r["seqlen"]): r for r in dec if r.get("layout") == "all-attention"}
    base_max = next((r for r in dec if r.get("layout") == "all-attention" and r.get("at_max_batch")), None)
    out = []
    for r in dec:
        if r.get("layout") == "all-attention":
            continue
        ref = base.get((r["batch"], r["seqlen"]))
        if ref:
            out.append(make_row(SUITE, "decode_speedup", "bench-stack", layout=r["layout"], batch=r["batch"],
                                seqlen=r["seqlen"], shape=r["shape"], speedup=r["tokens_per_s"] / ref["tokens_per_s"],
                                note="same batch and context as the transformer"))
        if r.get("at_max_batch") and base_max:
            out.append(make_row(SUITE, "decode_speedup", "bench-stack", layout=r["layout"], batch=r["batch"],
                                seqlen=r["seqlen"], shape=f"max batch {r['batch']} vs {base_max['batch']} L{r['seqlen']}",
                                speedup=r["tokens_per_s"] / base_max["tokens_per_s"],
                                note="each layout at the largest batch that fits"))
    return out


def profile_targets(model: ModelShape = APRIEL_15B_MODEL) -> list[tuple[str, Any]]:
    return []
