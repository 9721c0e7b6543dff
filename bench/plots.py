"""matplotlib PNGs from saved rows (a rows.json/rows.csv of any run, GPU or CPU fallback).

    make_plots(rows, out_dir) -> list[Path]
- throughput_vs_context.png: tokens/s of one attention layer (per provider) and one mixer layer vs context,
  one panel per (phase, batch) of the mixers suite;
- speedup_vs_context.png: attention time / mixer time vs context (> 1: the mixer wins), crossover marked;
- roofline.png: % of the measured-ceiling floor of each kernel row and of the mixers suite's layers;
- e2e.png: whole-model decode tokens/s vs batch (16k context) and vs context, and TTFT vs prompt length,
  per layout.
A figure without data is not written. Usage: `python -m bench plot rows.json --out DIR`.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _ok(rows, suite, **match):
    return [r for r in rows if r.get("suite") == suite and r.get("status") == "ok"
            and all(r.get(k) == v for k, v in match.items())]


def _panels(rows) -> list[tuple[str, int]]:
    return sorted({(r["phase"], r["batch"]) for r in _ok(rows, "mixers") if r.get("op") in ("attention_layer", "mixer_layer")
                   and r.get("seqlen")}, key=lambda x: (x[0] != "prefill", x[1]))


def _label(r) -> str:
    """"mixer" / an attention provider name; CPU-fallback rows say which reference they are."""
    if r["op"] == "mixer_layer":
        return "mixer" + (f" ({r['provider']})" if r["provider"] != "apriel" else "")
    return r["provider"] if r["provider"].startswith(("sdpa", "flash")) else f"attention ({r['provider']})"


def _series(rows, phase, batch, field) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in _ok(rows, "mixers", phase=phase, batch=batch):
        if r.get("op") in ("attention_layer", "mixer_layer") and r.get(field) is not None and r.get("seqlen"):
            out[_label(r)].append((int(r["seqlen"]), float(r[field])))
    return {k: ([x for x, _ in sorted(v)], [y for _, y in sorted(v)]) for k, v in out.items()}


def _grid(plt, n):
    cols = min(2, n)
    rows_ = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(6.5 * cols, 4.2 * rows_), squeeze=False)
    return fig, [ax for line in axes for ax in line]


def _title(rows) -> str:
    meta = next((r for r in rows if r.get("gpu")), {})
    return f"{meta.get('gpu', '')}  torch {meta.get('torch', '')}  {meta.get('commit', '')}  {meta.get('timestamp', '')}"


def throughput_vs_context(rows, out: Path, plt) -> Path | None:
    panels = _panels(rows)
    if not panels:
        return None
    fig, axes = _grid(plt, len(panels))
    for ax, (phase, b) in zip(axes, panels):
        for name, (xs, ys) in _series(rows, phase, b, "tokens_per_s").items():
            ax.plot(xs, ys, marker="o", lw=2.5 if name.startswith("mixer") else 1.5, label=name)
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="tokens/s through one layer",
               title=f"{phase}, batch {b}")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.suptitle("one attention layer vs one Mamba mixer layer\n" + _title(rows), fontsize=9)
    fig.tight_layout()
    path = out / "throughput_vs_context.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speedup_vs_context(rows, out: Path, plt) -> Path | None:
    from .mixers import crossovers

    panels = _panels(rows)
    if not panels:
        return None
    cross = {(c["phase"], c["batch"], c["vs"]): c for c in crossovers(rows)}
    fig, axes = _grid(plt, len(panels))
    drew = False
    for ax, (phase, b) in zip(axes, panels):
        series = _series(rows, phase, b, "p50_ms")
        mixer = next((v for k, v in series.items() if k.startswith("mixer")), None)
        if mixer is None:
            ax.set_title(f"{phase}, batch {b}: no mixer rows")
            continue
        m = dict(zip(*mixer))
        for name, (xs, ys) in series.items():
            if name.startswith("mixer"):
                continue
            pts = [(x, y / m[x]) for x, y in zip(xs, ys) if x in m]
            if not pts:
                continue
            drew = True
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} time / mixer time")[0]
            c = cross.get((phase, b, name))
            if c and c.get("interp_L"):
                ax.axvline(c["interp_L"], color=line.get_color(), ls=":", lw=1)
        ax.axhline(1.0, color="k", lw=1)
        ax.set(xlabel="context length (tokens)", ylabel="speedup of the mixer (x)", title=f"{phase}, batch {b}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.axis("off")
    if not drew:
        plt.close(fig)
        return None
    fig.suptitle("mixer speedup over attention (> 1: the mixer layer is faster; dotted: crossover)\n" + _title(rows), fontsize=9)
    fig.tight_layout()
    path = out / "speedup_vs_context.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def roofline(rows, out: Path, plt) -> Path | None:
    kern = [r for r in _ok(rows, "kernels") if r.get("pct_of_floor") is not None]
    mix = [r for r in _ok(rows, "mixers") if r.get("pct_of_floor") is not None and r.get("seqlen")]
    if not kern and not mix:
        return None
    n = int(bool(kern)) + int(bool(mix))
    fig, axes = plt.subplots(1, n, figsize=(7.5 * n, max(4.0, 0.22 * len(kern) + 1.5)), squeeze=False)
    axes = list(axes[0])
    if kern:
        ax = axes.pop(0)
        labels = [f"{r.get('op')} {r.get('provider')} {r.get('shape', '')}"[:60] for r in kern]
        ax.barh(range(len(kern)), [float(r["pct_of_floor"]) for r in kern], color="tab:blue")
        ax.set_yticks(range(len(kern)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(100, color="k", lw=1)
        ax.set(xlabel="% of the floor at the measured ceilings (100 = roofline)", title="kernels")
    if mix:
        ax = axes.pop(0)
        groups: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
        for r in mix:
            groups[(_label(r), r["phase"], r["batch"])].append((int(r["seqlen"]), float(r["pct_of_floor"])))
        # colour = provider, line = phase (solid prefill, dashed decode), marker = batch
        colors = {name: f"C{i}" for i, name in enumerate(sorted({k[0] for k in groups}))}
        markers = {b: m for b, m in zip(sorted({k[2] for k in groups}), "o^sDv")}
        for (name, phase, b), pts in sorted(groups.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[name], marker=markers[b], ms=4,
                    ls="-" if phase == "prefill" else "--", label=f"{name} {phase} b{b}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="context length (tokens)", ylabel="% of floor", title="layers (mixers suite)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("roofline: time at the measured ceilings / measured time\n" + _title(rows), fontsize=9)
    fig.tight_layout()
    path = out / "roofline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def e2e(rows, out: Path, plt) -> Path | None:
    dec = [r for r in _ok(rows, "e2e", op="model_decode") if r.get("tokens_per_s")]
    pre = [r for r in _ok(rows, "e2e", op="model_prefill") if r.get("p50_ms")]
    if not dec and not pre:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    layouts = sorted({r.get("layout") for r in dec + pre if r.get("layout")})
    for layout in layouts:
        for prov in sorted({r["provider"] for r in dec if r.get("layout") == layout}):
            mine = [r for r in dec if r.get("layout") == layout and r["provider"] == prov]
            by_b = sorted((r["batch"], r["tokens_per_s"]) for r in mine if r.get("seqlen") == 16384)
            by_l = {}
            for r in mine:
                by_l.setdefault(r["batch"], []).append((r["seqlen"], r["tokens_per_s"]))
            label = f"{layout} ({prov})"
            if by_b:
                axes[0].plot(*zip(*by_b), marker="o", label=label)
            b_ctx = max(by_l, key=lambda b: len(by_l[b]), default=None)
            if b_ctx is not None and len(by_l[b_ctx]) > 1:
                axes[1].plot(*zip(*sorted(by_l[b_ctx])), marker="o", label=f"{label} b{b_ctx}")
        p = sorted((r["seqlen"], r["p50_ms"]) for r in pre if r.get("layout") == layout)
        if p:
            axes[2].plot(*zip(*p), marker="o", label=layout)
    axes[0].set(xlabel="batch (sequences)", ylabel="decode tokens/s", title="decode vs batch, 16k context")
    axes[1].set(xlabel="context length", ylabel="decode tokens/s", title="decode vs context")
    axes[2].set(xlabel="prompt length", ylabel="time to first token (ms)", title="prefill (TTFT), batch 1")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("whole model, all-attention vs hybrid layouts\n" + _title(rows), fontsize=9)
    fig.tight_layout()
    path = out / "e2e.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(rows: list[dict[str, Any]], out_dir) -> list[Path]:
    """Every figure that has data; raises ImportError when matplotlib is missing (the caller reports it)."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for fn in (throughput_vs_context, speedup_vs_context, roofline, e2e):
        path = fn(rows, out, plt)
        if path is not None:
            made.append(path)
    return made
