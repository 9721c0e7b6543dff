"""kernels suite: the kernel microbenchmarks of each family, each against its floor and its installed peers.

    run(quick=False, ceilings=None, only=None) -> list[dict] rows
Folds in (imported lazily; each owned by its kernel's engineer): bench/kernels_scan.py (scan fwd and
fwd+bwd), bench/kernels_conv1d.py (conv1d fwd/bwd), bench/kernels_step.py (decode step), and
bench/kernels_attention.py (SDPA / flash-attn alone, the attention peers) and bench/kernels_decode_attn.py
(apriel_kernels.decode_attention vs SDPA at the engine's decode batches). Each exposes
`run(quick=False) -> list[dict]` (and may take ceilings=). A module that is missing or fails becomes a "not available" / "error"
row and the other modules still run. Rows are normalised to bench/rows.py (p50_us -> p50_ms, ...), and
where a row gives the bytes it moves but no % of ceiling, the % of this run's measured copy bandwidth is
added.
"""
from __future__ import annotations

import importlib
import inspect
import traceback
from typing import Any

from . import profiling
from .rows import error_row, normalize, unavailable

SUITE = "kernels"
MODULES = {"scan": "bench.kernels_scan", "conv1d": "bench.kernels_conv1d", "step": "bench.kernels_step",
           "attention": "bench.kernels_attention", "decode_attention": "bench.kernels_decode_attn"}


def _call_run(module, quick: bool, ceilings=None) -> list[dict[str, Any]]:
    run = getattr(module, "run", None)
    if run is None:
        raise AttributeError(f"{module.__name__} has no run(quick=False) function")
    params = inspect.signature(run).parameters
    kwargs = {"quick": quick} if "quick" in params else {}
    if "ceilings" in params:
        kwargs["ceilings"] = ceilings
    return list(run(**kwargs))


def _with_ceiling(row: dict[str, Any], ceil) -> dict[str, Any]:
    if ceil is None or row.get("status") != "ok":
        return row
    ms = row.get("p50_ms")
    nbytes = row.get("bytes") or row.get("nbytes")
    if ms and nbytes and row.get("gb_per_s") is None:
        row["gb_per_s"] = float(nbytes) / (ms * 1e-3) / 1e9
    if row.get("gb_per_s") is not None:
        row["pct_of_copy_bandwidth"] = 100.0 * float(row["gb_per_s"]) * 1e9 / ceil.copy_bytes_per_s
    if row.get("pct_of_floor") is None and row.get("floor_ms") is None and nbytes and ms:
        row["floor_ms"] = ceil.floor_ms(nbytes=float(nbytes))
        row["pct_of_floor"] = 100.0 * row["floor_ms"] / ms
    return row


def run(quick: bool = False, ceilings=None, only: str | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for family, name in MODULES.items():
        if only and only not in family:
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name == name:
                rows.append(unavailable(SUITE, family, "apriel", f"{name.replace('.', '/')}.py is not in this checkout yet"))
                continue
            rows.append(error_row(SUITE, family, "apriel", error))
            continue
        except Exception as error:  # noqa: BLE001 - a broken module must not stop the suite
            rows.append(error_row(SUITE, family, "apriel", error))
            continue
        try:
            with profiling.nvtx(f"kernels/{family}"):
                got = _call_run(module, quick, ceilings)
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            rows.append(error_row(SUITE, family, "apriel", error))
            continue
        for r in got:
            r = normalize(r, SUITE)
            r["suite"] = SUITE
            r.setdefault("family", family)
            rows.append(_with_ceiling(r, ceilings))
    return rows
