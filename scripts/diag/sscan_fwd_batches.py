"""Times the generic selective scan's forward (mamba's channel-major `selective_scan_fn`, bf16, d_state 16, d_inner
4096: bench.kernels_sscan's inputs) per forward version over batch sizes, to check the default's choice between v2
and v7 (APRIEL_SSCAN_FWD; session 25) and the v7 sequence split's segment count (session 27): a version "v7sN" is v7
with N segments (APRIEL_SSCAN_FWD_SEGMENTS=N), "v7" v7 with the default's segment count.
Run on the device after the extension is built:
    python3 scripts/diag/sscan_fwd_batches.py [--batches 1,2,3,4,5,6,8] [--seqlens 4096]
                                              [--versions auto,v2k4,v2k8,v7,v7s1] [--json OUT]
"""
import argparse
import json
import os

import torch

from apriel_kernels import selective_scan_fn
from bench.kernels_sscan import _inputs
from bench.timing import time_graph_ms
from bench.variants import sscan_version

parser = argparse.ArgumentParser()
parser.add_argument("--batches", default="1,2,3,4,5,6,8")
parser.add_argument("--seqlens", default="4096")
parser.add_argument("--versions", default="auto,v2k4,v2k8,v7")
parser.add_argument("--json")
opts = parser.parse_args()

rows = []
for seqlen, batch in ((int(s), int(b)) for s in opts.seqlens.split(",") for b in opts.batches.split(",")):
    args = _inputs(batch, seqlen, channel_major=True)
    line = []
    for version in opts.versions.split(","):
        with torch.no_grad(), sscan_version("FWD", version):
            p50 = time_graph_ms(lambda: selective_scan_fn(**args, delta_softplus=True))["p50"]  # noqa: B023
        rows.append({"batch": batch, "seqlen": seqlen, "version": version, "graph_p50_ms": p50})
        line.append(f"{version} {p50:.4f}")
    print(f"b{batch} L{seqlen}: " + "  ".join(line) + " ms (fwd, graph)", flush=True)
    del args

if opts.json:
    with open(opts.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "commit": os.environ.get("APRIEL_BENCH_COMMIT", "?"), "rows": rows}, f, indent=1)
