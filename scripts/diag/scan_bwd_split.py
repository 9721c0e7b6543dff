"""Times the mixer scan backward alone (the forward outside the timed region) over batch sizes and backward
configurations: v4, v7 unsplit and v7 with 2 / 4 / 8 sequence segments (APRIEL_SCAN_BWD_SEGMENTS), and the
default - to place the sequence split's segment rule (csrc/scan/scan_api.cpp bwd7_segments). bf16, the bar shape.
Also a CUDA kernel time table of the default at b1 L8192 (carry pre-pass vs main kernel).
Run on the device after the extension is built: python3 scripts/diag/scan_bwd_split.py [--json OUT]
"""
import json
import os
import sys

import torch
from scan_case import KW, make_case  # scripts/diag (this script's directory is on sys.path)
from torch.profiler import ProfilerActivity, profile

from apriel_kernels import mixer_scan
from bench.timing import time_ms
from bench.variants import env_override

CONFIGS = {"auto": (None, None), "v4": ("v4", None), "v7-s1": ("v7", "1"), "v7-s2": ("v7", "2"),
           "v7-s3": ("v7", "3"), "v7-s4": ("v7", "4"), "v7-s8": ("v7", "8")}
SHAPES = ((1, 2048), (1, 8192), (2, 4096), (3, 4096), (4, 4096), (8, 4096))


rows = []
for batch, seqlen in SHAPES:
    args, dy = make_case(batch, seqlen, requires_grad=True)
    leaves = list(args.values())
    y = mixer_scan(**args, **KW)
    for name, (version, segments) in CONFIGS.items():
        if batch >= 4 and name in ("v7-s3", "v7-s8"):
            continue
        with env_override("APRIEL_SCAN_BWD", version), env_override("APRIEL_SCAN_BWD_SEGMENTS", segments):
            ms = time_ms(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), rep_ms=200)["p50"]
        rows.append({"batch": batch, "seqlen": seqlen, "config": name, "bwd_p50_ms": ms})
        print(f"b{batch} L{seqlen} {name:6s}: bwd {ms:.4f} ms", flush=True)
    del args, dy, leaves, y

args, dy = make_case(1, 8192, requires_grad=True)
for _ in range(3):
    torch.autograd.grad(mixer_scan(**args, **KW), list(args.values()), dy)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        torch.autograd.grad(mixer_scan(**args, **KW), list(args.values()), dy)
    torch.cuda.synchronize()
table = sorted(({"kernel": e.key[:90], "ms_per_step": e.device_time_total / 5 / 1000.0, "calls_per_step": e.count // 5}
                for e in prof.key_averages() if e.device_time_total > 0), key=lambda r: -r["ms_per_step"])
for r in table[:12]:
    print(f"{r['ms_per_step']:8.4f} ms  x{r['calls_per_step']}  {r['kernel']}")
if "--json" in sys.argv:
    with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "commit": os.environ.get("APRIEL_BENCH_COMMIT", "?"), "rows": rows, "profile_b1_L8192": table},
                  f, indent=1)
