"""Times the mixer scan forward versions over batch sizes (bf16, the bar shape, CUDA-graph replay), to place the
default's switch points (csrc/scan/scan_api.cpp fwd_version). Prints one line per (batch, version).
Run on the device after the extension is built: python3 scripts/diag/scan_fwd_versions.py [--json OUT]
"""
import json
import os
import sys

import torch
from scan_case import KW, make_case  # scripts/diag (this script's directory is on sys.path)

from apriel_kernels import mixer_scan
from bench.timing import time_graph_ms

rows = []
for batch, seqlen in ((1, 8192), (2, 8192), (3, 4096), (4, 4096), (6, 4096), (8, 4096)):
    args, _ = make_case(batch, seqlen)
    for version in ("auto", "v4k8", "v5k4", "v7"):
        if version == "auto":
            os.environ.pop("APRIEL_SCAN_FWD", None)
        else:
            os.environ["APRIEL_SCAN_FWD"] = version
        with torch.no_grad():
            ms = time_graph_ms(lambda: mixer_scan(**args, **KW))["p50"]
        rows.append({"batch": batch, "seqlen": seqlen, "version": version, "p50_ms": ms})
        print(f"b{batch} L{seqlen} {version:5s}: {ms:.4f} ms")
    del args
os.environ.pop("APRIEL_SCAN_FWD", None)
if "--json" in sys.argv:
    with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
