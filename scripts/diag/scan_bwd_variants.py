"""Times the mixer scan backward alone (the forward outside the timed region) per value of an environment variable,
interleaved over rounds so machine drift spreads over every value. bf16, the bar shape (scan_case.py). For A/B of
compile-time kernel variants, an experiment adds a temporary switch to the launch (session 8: APRIEL_SCAN_BWD7_VAR,
removed with the losing variants); any existing switch works too, e.g. --env APRIEL_SCAN_BWD_SEGMENTS 1,2,4.
Run on the device after the extension is built:
    python3 scripts/diag/scan_bwd_variants.py VAR_LIST [--env NAME] [--rounds N] [--json OUT]
e.g. python3 scripts/diag/scan_bwd_variants.py 0,1,2,3 --json $OUT/variants.json
"""
import argparse
import json
import os
import statistics

import torch
from scan_case import KW, make_case  # scripts/diag (this script's directory is on sys.path)

from apriel_kernels import mixer_scan
from bench.timing import time_ms
from bench.variants import env_override

SHAPES = ((1, 8192), (8, 4096))

parser = argparse.ArgumentParser()
parser.add_argument("variants")
parser.add_argument("--env", default="APRIEL_SCAN_BWD7_VAR")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--json")
opts = parser.parse_args()
variants = opts.variants.split(",")

rows = []
for batch, seqlen in SHAPES:
    args, dy = make_case(batch, seqlen, requires_grad=True)
    leaves = list(args.values())
    y = mixer_scan(**args, **KW)
    samples = {v: [] for v in variants}
    for rnd in range(opts.rounds):
        order = variants if rnd % 2 == 0 else variants[::-1]
        for v in order:
            with env_override(opts.env, v):
                samples[v].append(time_ms(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True),
                                          rep_ms=150)["p50"])
    for v in variants:
        ms = statistics.median(samples[v])
        rows.append({"batch": batch, "seqlen": seqlen, "variant": v, "bwd_p50_ms": ms, "rounds": samples[v]})
        print(f"b{batch} L{seqlen} {opts.env}={v}: bwd {ms:.4f} ms  rounds {[round(s, 4) for s in samples[v]]}",
              flush=True)
    del args, dy, leaves, y

if opts.json:
    with open(opts.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "env": opts.env,
                   "commit": os.environ.get("APRIEL_BENCH_COMMIT", "?"), "rows": rows}, f, indent=1)
