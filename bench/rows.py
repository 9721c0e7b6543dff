"""Long-format benchmark rows: one dict per (suite, op, provider, shape) measurement, plus run metadata.

A row (every key optional except suite, op, provider, status):
    suite      "kernels" | "mixers" | "e2e" | "ceilings" | "cpu"
    op         what is measured, e.g. "attention_layer", "mixer_layer", "mixer_scan_fwd", "model_decode"
    provider   who computes it, e.g. "sdpa-flash", "sdpa-cudnn", "flash-attn", "apriel", "mamba-ssm"
    phase      "prefill" | "decode" | "fwd" | "fwd+bwd" | ...
    shape      readable shape string, e.g. "b1 L16384"; batch, seqlen also as ints when they apply
    p20_ms, p50_ms, p80_ms    device-event medians (bench/timing.py)
    tflop_s, gb_per_s, tokens_per_s                       achieved rates (when they apply)
    floor_ms   time at the measured ceilings (GEMM FLOP/s, copy bandwidth, exp2 rate) for this work
    pct_of_floor  100 * floor_ms / p50_ms ("% of the measured ceiling"; 100 = at the roofline)
    status     "ok" | "not available" | "error" | "skipped";  note: why, or how the row was made
Run metadata (gpu, torch, cuda, commit, timestamp) is stamped on every row by stamp() so a CSV row read
alone still says where it came from. Files: rows.json = {"meta": {...}, "rows": [...]}, rows.csv = one
row per line with the union of keys (CORE_FIELDS first).
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

CORE_FIELDS = (
    "suite", "op", "provider", "phase", "shape", "batch", "seqlen", "layout",
    "p20_ms", "p50_ms", "p80_ms", "tflop_s", "gb_per_s", "tokens_per_s", "floor_ms", "pct_of_floor",
    "status", "note", "gpu", "torch", "cuda", "commit", "timestamp",
)
ENV_FIELDS = ("gpu", "torch", "cuda", "commit", "timestamp")
STATUSES = ("ok", "not available", "error", "skipped")
_REQUIRED = ("suite", "op", "provider", "status")


def git_commit(root: str | os.PathLike | None = None) -> str:
    """HEAD of the checkout (+"-dirty" when tracked files changed); APRIEL_BENCH_COMMIT overrides it
    (the device machine gets a copy of the working tree that may lack .git)."""
    if os.environ.get("APRIEL_BENCH_COMMIT"):
        return os.environ["APRIEL_BENCH_COMMIT"]
    root = Path(root) if root else Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_name() -> str:
    """The GPU's name without creating a CUDA context in this process (nvidia-smi), so a parent that only
    launches the suites' child processes leaves them the whole device memory."""
    if not torch.cuda.is_available():
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return torch.cuda.get_device_name(0)


def environment() -> dict[str, str]:
    """gpu, torch, cuda, commit, timestamp (UTC ISO-8601) of this process."""
    gpu = gpu_name()
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def make_row(suite: str, op: str, provider: str, *, stats: dict[str, float] | None = None,
             status: str = "ok", **fields: Any) -> dict[str, Any]:
    """A row; stats is a timing.py result {"p20","p50","p80"} in ms."""
    if status not in STATUSES:
        raise ValueError(f"status: expected one of {STATUSES}, got {status!r}")
    row: dict[str, Any] = {"suite": suite, "op": op, "provider": provider, "status": status}
    if stats is not None:
        row.update(p20_ms=stats["p20"], p50_ms=stats["p50"], p80_ms=stats["p80"])
    row.update({k: v for k, v in fields.items() if v is not None})
    return row


def unavailable(suite: str, op: str, provider: str, reason: str, **fields: Any) -> dict[str, Any]:
    return make_row(suite, op, provider, status="not available", note=reason, **fields)


def error_row(suite: str, op: str, provider: str, error: BaseException, **fields: Any) -> dict[str, Any]:
    return make_row(suite, op, provider, status="error", note=f"{type(error).__name__}: {error}"[:500], **fields)


def add_rates(row: dict[str, Any], *, flops: float | None = None, nbytes: float | None = None,
              tokens: float | None = None, floor_ms: float | None = None) -> dict[str, Any]:
    """Fill tflop_s / gb_per_s / tokens_per_s / floor_ms / pct_of_floor from the row's p50_ms."""
    ms = row.get("p50_ms")
    if not ms or ms <= 0:
        return row
    if flops:
        row["tflop_s"] = flops / (ms * 1e-3) / 1e12
    if nbytes:
        row["gb_per_s"] = nbytes / (ms * 1e-3) / 1e9
    if tokens:
        row["tokens_per_s"] = tokens / (ms * 1e-3)
    if floor_ms:
        row["floor_ms"] = floor_ms
        row["pct_of_floor"] = 100.0 * floor_ms / ms
    return row


def normalize(row: dict[str, Any], suite: str | None = None) -> dict[str, Any]:
    """Bring a row from a module with its own conventions (p50_us, floor_us, pct_of_copy_ceiling, ...)
    to this format, keeping every original key."""
    row = dict(row)
    if suite and "suite" not in row:
        row["suite"] = suite
    row.setdefault("op", "unknown")
    row.setdefault("provider", "unknown")
    for q in ("p20", "p50", "p80", "floor"):
        if row.get(f"{q}_ms") is None and row.get(f"{q}_us") is not None:
            row[f"{q}_ms"] = float(row[f"{q}_us"]) / 1e3
    if row.get("pct_of_floor") is None:
        for key in ("pct_of_copy_ceiling", "pct_of_ceiling", "pct_of_gemm_ceiling", "pct_of_mufu"):
            if row.get(key) is not None:
                row["pct_of_floor"] = row[key]
                break
    if row.get("pct_of_floor") is None and row.get("floor_ms") and row.get("p50_ms"):
        row["pct_of_floor"] = 100.0 * float(row["floor_ms"]) / float(row["p50_ms"])
    if "shape" in row and not isinstance(row["shape"], str):
        row["shape"] = json.dumps(row["shape"]) if isinstance(row["shape"], (dict, list, tuple)) else str(row["shape"])
    if "status" not in row:  # a row with any figure is a measurement (e.g. a module's copy-ceiling row)
        measured = any(row.get(k) is not None for k in ("p50_ms", "gb_per_s", "tflop_s", "tokens_per_s"))
        row["status"] = "ok" if measured else "not available"
    return row


def validate(row: dict[str, Any]) -> None:
    """Raise ValueError naming the first problem of a row."""
    for key in _REQUIRED:
        if key not in row:
            raise ValueError(f"row: missing required key {key!r} in {row}")
    if row["status"] not in STATUSES:
        raise ValueError(f"row: status must be one of {STATUSES}, got {row['status']!r}")
    if row["status"] == "ok":
        for key in ("p20_ms", "p50_ms", "p80_ms"):
            if key in row and row[key] is not None and not float(row[key]) >= 0:
                raise ValueError(f"row: {key} must be >= 0, got {row[key]!r}")
        quantiles = [row.get(k) for k in ("p20_ms", "p50_ms", "p80_ms")]
        if None not in quantiles and not quantiles[0] <= quantiles[1] <= quantiles[2]:
            raise ValueError(f"row: expected p20 <= p50 <= p80, got {row['p20_ms']}, {row['p50_ms']}, {row['p80_ms']}")


def stamp(rows: Iterable[dict[str, Any]], env: dict[str, str]) -> list[dict[str, Any]]:
    """Copies of rows with the run's environment fields (existing values win)."""
    return [{**{k: env[k] for k in ENV_FIELDS if k in env}, **row} for row in rows]


def suite_main(description: str, run: Callable[..., list[dict[str, Any]]],
               format_row: Callable[[dict[str, Any]], str], header: str, argv: list[str] | None = None) -> int:
    """The command line of a kernel benchmark module: `--out FILE` (JSON {meta, rows}) and `--quick`; runs
    run(quick=...), stamps the rows with the environment, prints header + format_row(row) per ok row (a status
    line otherwise) and writes the JSON with the environment and the build's kernel report as meta."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=None, help="JSON file for {'meta', 'rows'}")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    args = ap.parse_args(argv)
    env = environment()
    rows = stamp(run(quick=args.quick), env)
    print(header)
    for row in rows:
        if row["status"] != "ok":
            print(f"{row.get('op')} {row.get('provider')} {row.get('shape')}: {row['status']} {row.get('note', '')}")
        else:
            print(format_row(row))
    if args.out:
        meta: dict[str, Any] = dict(env)
        try:
            from apriel_kernels import info

            meta["apriel_kernels"] = info(kernels=True)
        except Exception as e:  # noqa: BLE001 - metadata must not cost the measurements
            meta["apriel_kernels"] = f"unavailable: {e}"
        print(f"wrote {write_json(args.out, rows, meta=meta)}")
    return 0


# ------------------------------------------------------------------------------------------------ files
def write_json(path: str | os.PathLike, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta or {}, "rows": rows}, indent=1, default=str))
    return path


def fieldnames(rows: Iterable[dict[str, Any]]) -> list[str]:
    extra: list[str] = []
    for row in rows:
        extra.extend(k for k in row if k not in CORE_FIELDS and k not in extra)
    return [*CORE_FIELDS, *extra]


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames(rows), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()})
    return path


# Columns that are text even when they look like numbers: a commit hash such as "965e05702056" reads as a float
# (inf), "1234567" as an int; "cuda" "13.0" as a float.
TEXT_FIELDS = frozenset(("suite", "op", "provider", "phase", "shape", "layout", "status", "note", "dtype",
                         "state_dtype", *ENV_FIELDS))


def _parse_cell(name: str, value: str) -> Any:
    if value == "":
        return None
    if name in TEXT_FIELDS:
        return value
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value in ("True", "False"):
        return value == "True"
    return value


def read_rows(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, meta) from a rows.json (dict with rows, or a bare list of rows) or a rows.csv."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"rows file: {path} does not exist")
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = [{k: _parse_cell(k, v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
        return [normalize(r) for r in rows], {}
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return [normalize(r) for r in data], {}
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        return [normalize(r) for r in data["rows"]], data.get("meta", {})
    raise ValueError(f"rows file: {path} holds neither a list of rows nor {{'meta', 'rows'}}")


def key(row: dict[str, Any]) -> tuple:
    """What identifies a measurement across runs (for --compare)."""
    return (row.get("suite"), row.get("op"), row.get("provider"), row.get("phase"), row.get("layout"),
            str(row.get("shape")), row.get("dtype"), row.get("state_dtype"))
