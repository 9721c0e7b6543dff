"""Times the v4 mixer scan forward at K = 4 and K = 8 lanes per channel over batch sizes (bf16, apriel shape),
to place the default's switch point (csrc/scan/scan_api.cpp fwd_version). Prints one line per (batch, K).
Run on the device after the extension is built: python scripts/diag/scan_k_threshold.py
"""
import os

import torch

from apriel_kernels import mixer_scan
from bench.timing import time_graph_ms

D, X, N, R, W = 4096, 1024, 16, 16, 4
dev, dt = "cuda", torch.bfloat16
for batch, seqlen in ((1, 8192), (2, 8192), (3, 8192), (4, 4096), (6, 4096), (8, 4096)):
    args = dict(zxbc=torch.randn(batch, seqlen, 2 * D + 2 * X, device=dev, dtype=dt),
                dt_low=torch.randn(batch, seqlen, R, device=dev, dtype=dt) * 0.5,
                conv_weight=torch.randn(D, W, device=dev, dtype=dt) * 0.5,
                conv_bias=torch.randn(D, device=dev, dtype=dt) * 0.1,
                dt_proj_weight=torch.randn(D, R, device=dev, dtype=dt) * R ** -0.5,
                dt_proj_bias=torch.full((D,), -2.5, device=dev, dtype=dt),
                A_log=torch.log(torch.arange(1, N + 1, device=dev, dtype=torch.float32)).repeat(D, 1),
                D=torch.ones(D, device=dev))
    for k in ("v4k4", "v4k8"):
        os.environ["APRIEL_SCAN_FWD"] = k
        with torch.no_grad():
            ms = time_graph_ms(lambda: mixer_scan(**args, d_inner=D, d_xb=X, d_state=N))["p50"]
        print(f"b{batch} L{seqlen} blocks {batch * D // 16:5d} {k}: {ms:.4f} ms")
    del args
