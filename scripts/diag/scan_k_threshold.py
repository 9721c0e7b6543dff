"""Times the v4 mixer scan forward at K = 4 and K = 8 lanes per channel over batch sizes (bf16, apriel shape),
to place the default's switch point (csrc/scan/scan_api.cpp fwd_version). Prints one line per (batch, K).
Run on the device after the extension is built: python scripts/diag/scan_k_threshold.py
"""
import os

import torch
from scan_case import KW, make_case  # scripts/diag (this script's directory is on sys.path)

from apriel_kernels import mixer_scan
from bench.timing import time_graph_ms

for batch, seqlen in ((1, 8192), (2, 8192), (3, 8192), (4, 4096), (6, 4096), (8, 4096)):
    args, _ = make_case(batch, seqlen)
    for k in ("v4k4", "v4k8"):
        os.environ["APRIEL_SCAN_FWD"] = k
        with torch.no_grad():
            ms = time_graph_ms(lambda: mixer_scan(**args, **KW))["p50"]
        print(f"b{batch} L{seqlen} blocks {batch * KW['d_inner'] // 16:5d} {k}: {ms:.4f} ms")
    del args
