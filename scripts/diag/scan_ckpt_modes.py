"""Times the mixer scan per checkpoint mode (APRIEL_SCAN_CKPT: tile / sub), interleaved over rounds so machine drift
spreads over both: the forward that saves checkpoints (requires_grad), the backward alone (the forward run under the
same mode outside the timed region) and fwd+bwd, with fwd+bwd's peak extra memory. bf16, the bar's mixer shape
(scan_case.py) at several batches; --packed: packed documents (scan_case.documents) as seq_idx. Run on the device
after the extension is built:
    python3 scripts/diag/scan_ckpt_modes.py [--shapes 1x8192,2x4096,...] [--rounds N] [--packed] [--json OUT]
"""
import argparse
import json
import os
import statistics

import torch
from scan_case import KW, documents, make_case  # scripts/diag (this script's directory is on sys.path)

from apriel_kernels import mixer_scan
from apriel_kernels.mixer_scan import _checkpoint_mode
from bench.timing import peak_extra_mb, time_ms
from bench.variants import env_override

MODES = ("tile", "sub")

parser = argparse.ArgumentParser()
parser.add_argument("--shapes", default="1x8192,2x4096,3x4096,4x4096,8x4096")
parser.add_argument("--rounds", type=int, default=2)
parser.add_argument("--packed", action="store_true")
parser.add_argument("--json")
opts = parser.parse_args()

rows = []
for shape in opts.shapes.split(","):
    batch, seqlen = (int(v) for v in shape.split("x"))
    args, dy = make_case(batch, seqlen, requires_grad=True)
    seq = documents(batch, seqlen) if opts.packed else None
    kw = dict(KW, seq_idx=seq)
    leaves = list(args.values())
    samples = {(m, phase): [] for m in MODES for phase in ("fwd", "bwd", "fwd+bwd")}
    peaks = {}
    for rnd in range(opts.rounds):
        for mode in MODES if rnd % 2 == 0 else MODES[::-1]:
            with env_override("APRIEL_SCAN_CKPT", mode):
                def step():
                    return torch.autograd.grad(mixer_scan(**args, **kw), leaves, dy)

                samples[(mode, "fwd")].append(time_ms(lambda: mixer_scan(**args, **kw), rep_ms=150)["p50"])
                y = mixer_scan(**args, **kw)
                samples[(mode, "bwd")].append(
                    time_ms(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), rep_ms=150)["p50"])
                del y
                samples[(mode, "fwd+bwd")].append(time_ms(step, rep_ms=150)["p50"])
                peaks[mode] = peak_extra_mb(step)[0]
    for mode in MODES:
        with env_override("APRIEL_SCAN_CKPT", mode):
            saved = _checkpoint_mode(args["zxbc"], args["dt_low"], seq, KW["d_inner"], KW["d_xb"], True)
        row = {"batch": batch, "seqlen": seqlen, "packed": opts.packed, "mode": mode, "checkpoint_mode": saved,
               "peak_extra_mem_mb": peaks[mode]}
        for phase in ("fwd", "bwd", "fwd+bwd"):
            row[f"{phase}_p50_ms"] = statistics.median(samples[(mode, phase)])
            row[f"{phase}_rounds"] = samples[(mode, phase)]
        rows.append(row)
        print(f"b{batch} L{seqlen}{' packed' if opts.packed else ''} {mode:4} (mode {saved}): "
              f"fwd {row['fwd_p50_ms']:.4f} bwd {row['bwd_p50_ms']:.4f} fwd+bwd {row['fwd+bwd_p50_ms']:.4f} ms, "
              f"peak {peaks[mode]:.0f} MB", flush=True)
    del args, dy, leaves

if opts.json:
    with open(opts.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "commit": os.environ.get("APRIEL_BENCH_COMMIT", "?"), "rows": rows}, f, indent=1)
