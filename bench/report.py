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
