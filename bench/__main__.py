"""`python -m bench` (console script apriel-bench): run suites, save rows, print tables, plot, compare.

    python -m bench {kernels,mixers,e2e,all} [--out DIR] [--compare old.json] [--quick] [--nsys]
                    [--nvtx-layers] [--profile] [--only FAMILY] [--e2e-layers N] [--no-plots]
    python -m bench plot ROWS.json|ROWS.csv [--out DIR]      plots from saved rows
    python -m bench compare NEW.json OLD.json                  ratios table
Writes DIR/rows.json ({"meta", "rows"}), DIR/rows.csv and DIR/*.png. Every suite (and each measurement
inside one) is wrapped: a failure becomes an "error" row, is printed, and the rest still runs. Without a
CUDA device the kernels and mixers suites run a reduced set on the reference ops (bench/cpu.py), labelled.
The ceilings (copy bandwidth, bf16 GEMM) are measured first; the measured region is bracketed by
cudaProfilerStart/Stop (for `nsys profile --capture-range=cudaProfilerApi`, which --nsys runs for you).
On a GPU each unit (ceilings, each kernel family, mixers, e2e) runs in its own child process with a
timeout, so a kernel that faults (a CUDA error poisons its process) or hangs costs only its own rows;
--in-process runs everything in this process (debugging; what --nsys uses).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from . import profiling, report
from .rows import environment, error_row, make_row, read_rows, stamp, write_csv, write_json

SUITES = ("kernels", "mixers", "e2e")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=(*SUITES, "all", "plot", "compare", "report", "ceilings"),
                   help="a suite to run, or plot / compare / report (tables + crossovers) from saved rows")
    p.add_argument("files", nargs="*", help="plot: ROWS file; compare: NEW OLD")
    p.add_argument("--out", default="bench_out", help="output directory (rows.json, rows.csv, PNGs, traces)")
    p.add_argument("--compare", metavar="OLD_JSON", help="print ratios of this run to a previous rows.json")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (CI, debugging)")
    p.add_argument("--nsys", action="store_true",
                   help="re-run under `nsys profile --capture-range=cudaProfilerApi` (torch.profiler trace if no nsys)")
    p.add_argument("--nvtx-layers", action="store_true", help="NVTX ranges per layer / per layer component")
    p.add_argument("--profile", action="store_true", help="write torch.profiler chrome traces of representative calls")
    p.add_argument("--only", help="kernels: only the family whose name contains this (scan, conv1d, step); "
                                  "e2e: stack or engine")
    p.add_argument("--e2e-layers", type=int, default=None, help="e2e: layers of the preset (default: all 50)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--markdown", action="store_true", help="report: README-ready markdown summary")
    p.add_argument("--in-process", action="store_true", help="no child process per unit (debugging, nsys)")
    p.add_argument("--total-budget-s", type=float, default=470,
                   help="GPU runs: wall-clock budget of the whole run (default 470 s: the 8-minute bar), split "
                        "among the units still to run by weight (SHARE_WEIGHT); 0 = no total budget")
    p.add_argument("--skip", default="", help="comma-separated units to leave out, e.g. kernels:scan,e2e:engine,mixers")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft time budget of a suite: later measurements become 'skipped' rows")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ceilings", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.suite in ("plot", "report") and len(args.files) != 1:
        p.error(f"{args.suite}: expected one ROWS file")
    if args.suite == "compare" and len(args.files) != 2:
        p.error("compare: expected NEW and OLD rows files")
    if args.e2e_layers is not None and args.e2e_layers < 1:
        p.error(f"--e2e-layers: expected a positive number of layers, got {args.e2e_layers}")
    return args


def run_suite(name: str, args: argparse.Namespace, ceilings) -> list[dict[str, Any]]:
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    if not torch.cuda.is_available():
        from . import cpu

        print(f"[{name}] no CUDA device: CPU fallback on the reference ops at tiny shapes (not GPU figures)")
        return cpu.run(name, quick=args.quick)
    if name == "kernels":
        from . import kernels

        return kernels.run(quick=args.quick, ceilings=ceilings, only=args.only)
    if name == "mixers":
        from . import mixers

        return mixers.run(quick=args.quick, ceilings=ceilings, deadline=deadline)
    from . import e2e

    part = args.only if args.only in e2e.PARTS else None
    return e2e.run(quick=args.quick, ceilings=ceilings, layers=args.e2e_layers, deadline=deadline,
                   stack=part in (None, "stack"), engine=part in (None, "engine"))


def _plot(rows, out: Path) -> list[Path]:
    try:
        from .plots import make_plots

        paths = make_plots(rows, out)
    except ImportError as error:
        print(f"plots: skipped ({error}); make them later with `python -m bench plot {out / 'rows.json'}`")
        return []
    except Exception:  # noqa: BLE001 - plotting must not lose the saved rows
        traceback.print_exc()
        return []
    for path in paths:
        print(f"plot: {path}")
    return paths


def _compare(rows, old_path: str) -> None:
    from .compare import compare, unmatched

    old_rows, _ = read_rows(old_path)
    report.print_compare(compare(rows, old_rows), *unmatched(rows, old_rows))


def _profile(out: Path, suites: list[str]) -> None:
    """torch.profiler chrome traces of a few representative calls (the fallback of --nsys)."""
    if not torch.cuda.is_available():
        print("profile: no CUDA device, nothing to trace")
        return
    from . import mixers

    targets = mixers.profile_targets() if "mixers" in suites or "e2e" in suites else []
    for name, fn in targets:
        try:
            path = profiling.torch_trace(fn, out / f"trace_{name}.json")
            print(f"profile: {path} (open in chrome://tracing or ui.perfetto.dev)")
        except Exception:  # noqa: BLE001
            traceback.print_exc()


# (quick, full) seconds before a unit's child process is killed; each suite also gets a soft budget
# 30 s shorter, after which its remaining measurements become "skipped" rows instead of being lost.
UNIT_TIMEOUT_S = {"ceilings": (120, 120), "kernels": (150, 300), "mixers": (210, 420), "e2e:stack": (240, 480),
                  "e2e:engine": (210, 420)}
# --total-budget-s splits what is left among the units still to run by these weights (time a unit does not
# use flows to the later ones); the mixers and e2e stack carry the bar's figures, so they weigh most.
SHARE_WEIGHT = {"ceilings": 0.5, "kernels": 1.0, "mixers": 3.0, "e2e:stack": 3.0, "e2e:engine": 1.5}
MIN_TIMEOUT_S = 30


def _unit_key(suite: str, part: str | None) -> str:
    return f"{suite}:{part}" if f"{suite}:{part}" in UNIT_TIMEOUT_S else suite


def _ceilings_meta(ceil) -> dict[str, float]:
    return {"copy_gb_per_s": ceil.copy_bytes_per_s / 1e9, "gemm_bf16_tflop_s": ceil.gemm_bf16_flops / 1e12,
            "exp2_t_per_s": ceil.exp2_per_s / 1e12}


def _measure_ceilings(out: Path | None = None):
    from . import ceilings

    ceil = ceilings.measure()
    print(f"ceilings: copy {ceil.copy_bytes_per_s / 1e12:.2f} TB/s, bf16 GEMM {ceil.gemm_bf16_flops / 1e12:.0f} TFLOP/s, "
          f"exp2 {ceil.exp2_per_s / 1e12:.2f} T/s (datasheet)")
    if out is not None:
        (out / "ceilings.json").write_text(json.dumps(dataclasses.asdict(ceil)))
    return ceil


def _load_ceilings(path: str | None):
    if not path or not Path(path).exists():
        return None
    from .ceilings import Ceilings

    return Ceilings(**json.loads(Path(path).read_text()))


def _child_main(args: argparse.Namespace, out: Path) -> int:
    """One unit in this process: rows to out/rows.json (the parent merges them)."""
    profiling.set_layer_ranges(args.nvtx_layers)
    if args.suite == "ceilings":
        ceil = _measure_ceilings(out)
        write_json(out / "rows.json", ceil.as_rows())
        return 0
    ceil = _load_ceilings(args.ceilings)
    with profiling.measured_region(), profiling.nvtx(f"suite/{args.suite}"):
        rows = run_suite(args.suite, args, ceil)
    write_json(out / "rows.json", rows)
    return 0


def _units(suites: list[str], args: argparse.Namespace) -> list[tuple[str, str | None]]:
    from .kernels import MODULES

    units: list[tuple[str, str | None]] = [("ceilings", None)]
    for name in suites:
        if name == "kernels":
            units += [("kernels", fam) for fam in MODULES if not args.only or args.only in fam]
        elif name == "e2e":
            from .e2e import PARTS

            units += [("e2e", part) for part in PARTS if not args.only or args.only not in PARTS or args.only == part]
        else:
            units.append((name, None))
    skip = {u.strip() for u in (getattr(args, "skip", "") or "").split(",") if u.strip()}
    return [(s, p) for s, p in units if s not in skip and f"{s}:{p}" not in skip]


def _run_unit(suite: str, part: str | None, args: argparse.Namespace, tmp: Path, ceil_file: Path,
              timeout: int | None = None) -> list[dict[str, Any]]:
    """Run one unit in a child process with a timeout; its rows, or an error row saying what happened.
    The child's soft budget is 30 s shorter (imports, CUDA start, writing rows)."""
    out = tmp / f"{suite}-{part or 'all'}"
    timeout = timeout or UNIT_TIMEOUT_S[_unit_key(suite, part)][0 if args.quick else 1]
    cmd = [sys.executable, "-m", "bench", suite, "--child", "--out", str(out), "--ceilings", str(ceil_file),
           "--budget-s", str(max(10, timeout - 30))]
    cmd += ["--quick"] * args.quick + ["--nvtx-layers"] * args.nvtx_layers
    cmd += ["--only", part] if part else []
    cmd += ["--e2e-layers", str(args.e2e_layers)] if args.e2e_layers else []
    op = part or suite
    try:
        proc = subprocess.run(cmd, timeout=timeout, stderr=subprocess.PIPE, text=True, check=False)
    except subprocess.TimeoutExpired as error:
        sys.stderr.write((error.stderr or b"")[-4000:].decode(errors="replace") if isinstance(error.stderr, bytes) else (error.stderr or "")[-4000:])
        return [make_row(suite, op, "bench", status="error", note=f"unit killed after its {timeout} s timeout")]
    sys.stderr.write(proc.stderr[-6000:])
    rows: list[dict[str, Any]] = []
    if (out / "rows.json").exists():
        rows, _ = read_rows(out / "rows.json")
    if proc.returncode != 0:
        tail = " | ".join(line for line in proc.stderr.strip().splitlines()[-3:])
        rows.append(make_row(suite, op, "bench", status="error", note=f"unit exited with {proc.returncode}: {tail}"[:500]))
    return rows


def _print_report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from .mixers import crossovers

    for name in ("ceilings", *SUITES):
        report.print_rows(rows, name)
    if any(r.get("suite") == "mixers" for r in rows):
        report.print_crossovers(crossovers(rows))
    if meta.get("wall_s"):
        print(f"wall seconds: {meta['wall_s']}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    if args.suite == "plot":
        rows, _ = read_rows(args.files[0])
        _plot(rows, out)
        return 0
    if args.suite == "compare":
        new_rows, _ = read_rows(args.files[0])
        _compare(new_rows, args.files[1])
        return 0
    if args.suite == "report":
        rows, meta = read_rows(args.files[0])
        if args.markdown:
            print(report.markdown(rows, meta))
        else:
            _print_report(rows, meta)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return _child_main(args, out)
    if args.nsys:
        cmd = profiling.nsys_command(argv, out)
        if cmd is not None:
            print("nsys:", " ".join(cmd))
            return subprocess.call(cmd)
        print("--nsys: nsys is not on the PATH; writing torch.profiler chrome traces instead (--profile)")
        args.profile = True
    profiling.set_layer_ranges(args.nvtx_layers)
    suites = list(SUITES) if args.suite == "all" else [] if args.suite == "ceilings" else [args.suite]
    env = environment()
    started = time.time()
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {**env, "argv": argv, "suites": suites, "quick": args.quick, "wall_s": {}}
    cuda = torch.cuda.is_available()
    if not cuda:
        meta["cpu_fallback"] = True
    if cuda and not args.in_process:
        with tempfile.TemporaryDirectory(prefix="bench_units_") as tmp:
            tmp = Path(tmp)
            ceil_file = tmp / "ceilings-all" / "ceilings.json"
            units = _units(suites, args)
            for i, (suite, part) in enumerate(units):
                t0 = time.time()
                timeout = UNIT_TIMEOUT_S[_unit_key(suite, part)][0 if args.quick else 1]
                if args.total_budget_s:
                    weights = [SHARE_WEIGHT[_unit_key(*u)] for u in units[i:]]
                    share = (started + args.total_budget_s - t0) * weights[0] / sum(weights)
                    timeout = int(max(MIN_TIMEOUT_S, min(timeout, share)))
                rows += _run_unit(suite, part, args, tmp, ceil_file, timeout)
                label = f"{suite}:{part}" if part else suite
                meta["wall_s"][label] = round(time.time() - t0, 1)
                print(f"[{label}] {meta['wall_s'][label]} s", flush=True)
            if ceil_file.exists():
                meta["ceilings"] = _ceilings_meta(_load_ceilings(str(ceil_file)))
    else:
        ceil = None
        if cuda:
            try:
                ceil = _measure_ceilings()
                rows += ceil.as_rows()
                meta["ceilings"] = _ceilings_meta(ceil)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                rows.append(error_row("ceilings", "ceilings", "torch", error))
        with profiling.measured_region():
            for name in suites:
                t0 = time.time()
                try:
                    with profiling.nvtx(f"suite/{name}"):
                        rows += run_suite(name, args, ceil)
                except Exception as error:  # noqa: BLE001 - one suite failing leaves the others
                    traceback.print_exc()
                    rows.append(error_row(name, "suite", "bench", error))
                meta["wall_s"][name] = round(time.time() - t0, 1)
                print(f"[{name}] {meta['wall_s'][name]} s", flush=True)
                if cuda:
                    torch.cuda.empty_cache()
    if "mixers" in suites:
        from .mixers import crossover_rows

        rows += crossover_rows(rows)
    meta["wall_s"]["total"] = round(time.time() - started, 1)
    rows = stamp(rows, env)
    write_json(out / "rows.json", rows, meta)
    write_csv(out / "rows.csv", rows)
    _print_report(rows, meta)
    if not args.no_plots:
        _plot(rows, out)
    if args.compare:
        try:
            _compare(rows, args.compare)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    if args.profile:
        _profile(out, suites)
    bad = [r for r in rows if r.get("status") == "error"]
    print(f"rows: {out / 'rows.json'}, {out / 'rows.csv'} ({len(rows)} rows, {len(bad)} errors); "
          f"wall {meta['wall_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
