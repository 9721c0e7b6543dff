"""Where the varlen plan's cost goes when it keeps the batch-1-3 kernel (session 17: 7-22 us per call): the
per-kernel device times (torch.profiler, mean over --iters calls) of the packed forward under the default dispatch
and with the plan off (APRIEL_SCAN_VARLEN=0), plus the wall time per call of both, for one long document per
sequence (the plan keeps v5) and ~250-token documents (the plan picks varlen). Run on the device after the build:
    python3 scripts/diag/scan_varlen_profile.py [--shapes 1x4096,1x8192] [--json OUT]
"""
import argparse
import json
import os

import torch
from scan_case import KW, documents, make_case  # scripts/diag (this script's directory is on sys.path)
from torch.profiler import ProfilerActivity, profile

from apriel_kernels import mixer_scan
from bench.timing import time_ms
from bench.variants import env_override

parser = argparse.ArgumentParser()
parser.add_argument("--shapes", default="1x4096,1x8192,3x4096")
parser.add_argument("--iters", type=int, default=20)
parser.add_argument("--json")
opts = parser.parse_args()

rows = []
for shape in opts.shapes.split(","):
    b, L = (int(v) for v in shape.split("x"))
    args, _ = make_case(b, L)
    for mean in (0, 250):
        seq = documents(b, L, mean) if mean else torch.zeros(b, L, dtype=torch.int32, device="cuda")
        for mode, env in (("auto", None), ("off", "0")):
            call = lambda: mixer_scan(**args, **KW, seq_idx=seq)  # noqa: E731
            with env_override("APRIEL_SCAN_VARLEN", env), torch.no_grad():
                wall = time_ms(call, rep_ms=100)["p50"]
                call()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(opts.iters):
                        call()
                    torch.cuda.synchronize()
            kernels = {}
            for e in prof.key_averages():  # the kernels: the events with their own device time
                t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                if t > 0 and e.count > 0:
                    kernels[e.key[:90]] = {"count": e.count, "mean_us": t / e.count}
            row = {"batch": b, "seqlen": L, "doc_mean": mean, "mode": mode, "wall_p50_ms": wall, "kernels": kernels}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
            for name, k in sorted(kernels.items(), key=lambda kv: -kv[1]["mean_us"]):
                print(f"    {k['mean_us']:9.2f} us x{k['count'] // opts.iters}  {name}", flush=True)

if opts.json:
    with open(opts.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "commit": os.environ.get("APRIEL_BENCH_COMMIT", "?"), "rows": rows}, f, indent=1)
