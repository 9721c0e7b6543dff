"""`--compare old.json`: ratios of this run to a previous one, matched by (suite, op, provider, phase,
layout, shape).

    compare(new_rows, old_rows) -> list[dict]  {suite, op, provider, phase, layout, shape, old_ms, new_ms,
                                                speedup (old / new: > 1 means faster now), metric}
Rows with no time (e.g. a decode_speedup summary) compare their tokens_per_s or speedup field instead.
"""
from __future__ import annotations

from typing import Any

from .rows import key

_METRICS = (("p50_ms", False), ("tokens_per_s", True), ("speedup", True), ("tflop_s", True), ("gb_per_s", True))


def _metric(row: dict[str, Any]) -> tuple[str, float, bool] | None:
    for name, higher_better in _METRICS:
        v = row.get(name)
        if isinstance(v, (int, float)) and v > 0:
            return name, float(v), higher_better
    return None


def compare(new_rows: list[dict[str, Any]], old_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    old = {key(r): r for r in old_rows if r.get("status", "ok") == "ok"}
    out = []
    for r in new_rows:
        if r.get("status", "ok") != "ok" or key(r) not in old:
            continue
        m_new, m_old = _metric(r), _metric(old[key(r)])
        if m_new is None or m_old is None or m_new[0] != m_old[0]:
            continue
        name, v_new, higher = m_new
        v_old = m_old[1]
        out.append({"suite": r.get("suite"), "op": r.get("op"), "provider": r.get("provider"),
                    "phase": r.get("phase"), "layout": r.get("layout"), "shape": r.get("shape"), "metric": name,
                    "old": v_old, "new": v_new, "speedup": (v_new / v_old) if higher else (v_old / v_new)})
    return out


def unmatched(new_rows: list[dict[str, Any]], old_rows: list[dict[str, Any]]) -> tuple[int, int]:
    """(rows only in the new run, rows only in the old run), counting ok rows."""
    new_keys = {key(r) for r in new_rows if r.get("status", "ok") == "ok"}
    old_keys = {key(r) for r in old_rows if r.get("status", "ok") == "ok"}
    return len(new_keys - old_keys), len(old_keys - new_keys)
