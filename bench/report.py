"""Tables on screen (rich when installed, plain text otherwise) from rows."""
from __future__ import annotations

from typing import Any

try:
    from rich.console import Console
    from rich.table import Table

    _CONSOLE = Console(width=200)
except ImportError:  # rich is an optional extra; the suite must still print
    Console = Table = None
    _CONSOLE = None


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def rate(row: dict[str, Any]) -> str:
    parts = []
    if row.get("tflop_s") is not None:
        parts.append(f"{row['tflop_s']:.0f} TFLOP/s")
    if row.get("gb_per_s") is not None:
        parts.append(f"{row['gb_per_s']:.0f} GB/s")
    if row.get("tokens_per_s") is not None:
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if row.get("speedup") is not None:
        parts.append(f"{row['speedup']:.2f}x")
    return ", ".join(parts)


def print_table(title: str, columns: list[str], data: list[list[str]]) -> None:
    if _CONSOLE is not None:
        table = Table(title=title, show_lines=False, header_style="bold")
        for c in columns:
            table.add_column(c, overflow="fold")
        for r in data:
            table.add_row(*r)
        _CONSOLE.print(table)
        return
    widths = [max(len(c), *(len(r[i]) for r in data)) if data else len(c) for i, c in enumerate(columns)]
    print(f"\n== {title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in data:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)))


def print_rows(rows: list[dict[str, Any]], suite: str) -> None:
    mine = [r for r in rows if r.get("suite") == suite and r.get("op") not in ("crossover",)]
    if not mine:
        return
    columns = ["op", "provider", "phase", "layout", "shape", "p50 ms", "p20-p80", "rate", "% floor", "status / note"]
    data = []
    for r in mine:
        spread = f"{_fmt(r.get('p20_ms'))}-{_fmt(r.get('p80_ms'))}" if r.get("p20_ms") is not None else ""
        note = r["status"] if r.get("status") != "ok" else ""
        if r.get("status") != "ok" and r.get("note"):
            note += f": {r['note'][:90]}"
        for extra in ("max_batch", "mib_per_seq", "ttft_ms"):
            if r.get(extra) is not None and r.get("status") == "ok":
                note += f" {extra}={_fmt(r[extra])}"
        data.append([str(r.get("op", "")), str(r.get("provider", "")), str(r.get("phase") or ""),
                     str(r.get("layout") or ""), str(r.get("shape") or ""), _fmt(r.get("p50_ms")), spread, rate(r),
                     _fmt(r.get("pct_of_floor"), 2), note.strip()])
    print_table(f"{suite}", columns, data)


def print_crossovers(summaries: list[dict[str, Any]]) -> None:
    if not summaries:
        print("mixers: no crossover (no mixer and attention rows measured at common context lengths)")
        return
    data = [[s["phase"], str(s["batch"]), s["vs"], _fmt(s.get("crossover_L")), _fmt(s.get("interp_L")), s["verdict"]]
            for s in summaries]
    print_table("mixer vs attention crossover (context where one Mamba mixer layer beats one attention layer)",
                ["phase", "batch", "attention", "first measured L", "interpolated L", "verdict"], data)


def print_compare(ratios: list[dict[str, Any]], only_new: int, only_old: int) -> None:
    data = [[str(r["suite"]), str(r["op"]), str(r["provider"]), str(r.get("phase") or ""), str(r.get("layout") or ""),
             str(r.get("shape") or ""), r["metric"], _fmt(r["old"]), _fmt(r["new"]), f"{r['speedup']:.2f}x"]
            for r in ratios]
    print_table(f"compare: new vs old (speedup > 1 = faster now); {only_new} rows only new, {only_old} only old",
                ["suite", "op", "provider", "phase", "layout", "shape", "metric", "old", "new", "speedup"], data)


# ------------------------------------------------------------------------------------------- markdown
def _md_table(columns: list[str], data: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in data]
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """README-ready summary of a run: ceilings, crossovers, layer times, e2e, kernels (ok rows only)."""
    from .mixers import crossovers

    ok = [r for r in rows if r.get("status") == "ok"]
    env = next((r for r in rows if r.get("gpu")), {})
    out = [(f"Run: {env.get('gpu', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, commit "
            f"{env.get('commit', '?')}, {env.get('timestamp', '?')}; wall seconds {meta.get('wall_s', {})}.")]
    c = meta.get("ceilings")
    if c:
        out.append(f"Ceilings measured at the start: copy {c['copy_gb_per_s']:.0f} GB/s, bf16 GEMM "
                   f"{c['gemm_bf16_tflop_s']:.0f} TFLOP/s; exp2 {c['exp2_t_per_s']:.2f} T/s (datasheet).")
    cross = crossovers(rows)
    if cross:
        out.append("\n**Crossover: context from which one Mamba mixer layer beats one attention layer**\n")
        out.append(_md_table(["phase", "batch", "vs", "first measured L", "interpolated L", "verdict"],
                             [[x["phase"], str(x["batch"]), x["vs"], _fmt(x.get("crossover_L")), _fmt(x.get("interp_L")),
                               x["verdict"]] for x in cross]))
    layer = [r for r in ok if r.get("suite") == "mixers" and r.get("op") in ("attention_layer", "mixer_layer")]
    if layer:
        out.append("\n**One layer (apriel-15b shape), p50 ms (% of floor)**\n")
        keys = sorted({(r["phase"], r["batch"], r["seqlen"]) for r in layer}, key=lambda k: (k[0] != "prefill", k[1], k[2]))
        provs = sorted({(r["op"], r["provider"]) for r in layer}, key=lambda p: p[0] != "mixer_layer")
        by = {(r["phase"], r["batch"], r["seqlen"], r["op"], r["provider"]): r for r in layer}
        data = []
        for k in keys:
            cells = []
            for op, p in provs:
                r = by.get((*k, op, p))
                cells.append(f"{r['p50_ms']:.3g} ({r.get('pct_of_floor', 0):.0f}%)" if r else "")
            data.append([k[0], str(k[1]), str(k[2]), *cells])
        out.append(_md_table(["phase", "batch", "context", *[("mixer" if op == "mixer_layer" else p) for op, p in provs]], data))
    e2e = [r for r in ok if r.get("suite") == "e2e"]
    if e2e:
        out.append("\n**Whole model (e2e)**\n")
        data = []
        for r in e2e:
            if r.get("op") not in ("model_decode", "model_prefill", "memory_per_sequence", "decode_speedup", "model_decode_speedup"):
                continue
            extra = []
            for k in ("max_batch", "mib_per_seq", "weights_gib", "speedup", "at_max_batch"):
                if r.get(k) is not None:
                    extra.append(f"{k}={_fmt(r[k])}")
            data.append([str(r.get("op")), str(r.get("provider")), str(r.get("layout") or ""), str(r.get("shape") or ""),
                         _fmt(r.get("p50_ms")), _fmt(r.get("tokens_per_s")), _fmt(r.get("pct_of_floor"), 2), " ".join(extra)])
        out.append(_md_table(["op", "provider", "layout", "shape", "p50 ms", "tokens/s", "% of bound", "notes"], data))
    kern = [r for r in ok if r.get("suite") == "kernels" and r.get("p50_ms") is not None]
    if kern:
        out.append("\n**Kernels**\n")
        out.append(_md_table(["op", "provider", "phase", "shape", "p50 ms", "rate", "% of floor"],
                             [[str(r.get("op")), str(r.get("provider")), str(r.get("phase") or ""), str(r.get("shape") or ""),
                               _fmt(r.get("p50_ms")), rate(r), _fmt(r.get("pct_of_floor"), 2)] for r in kern]))
    bad = [r for r in rows if r.get("status") in ("error", "not available", "skipped")]
    if bad:
        out.append(f"\n{len(bad)} rows not measured (status error / not available / skipped); see rows.json notes.")
    return "\n".join(out) + "\n"
