"""Kernel table (torch profiler, CUDA time) of the generic selective scan (mamba's channel-major `selective_scan_fn`,
bf16, d_state 16, d_inner 4096: bench.kernels_sscan's inputs) per version: where the time goes besides the scan
kernel (a split's pre-pass, dy's copy, the partial sums, the casts). Session 26 (backward); session 28: --forward.
    python3 scripts/diag/sscan_bwd_profile.py [--batch 8] [--seqlen 4096] [--versions v2,v7] [--forward]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from apriel_kernels import selective_scan_fn
from bench.kernels_sscan import D, _inputs
from bench.variants import sscan_version

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--seqlen", type=int, default=4096)
parser.add_argument("--versions", default="v2,v7", help="auto, v2, v7 or v7sN (N segments)")
parser.add_argument("--forward", action="store_true", help="profile the forward instead of the backward")
opts = parser.parse_args()

args = _inputs(opts.batch, opts.seqlen, channel_major=True, requires_grad=not opts.forward)
leaves = list(args.values())
if opts.forward:
    def run():
        with torch.no_grad():
            selective_scan_fn(**args, delta_softplus=True)
else:
    dy = torch.randn(opts.batch, D, opts.seqlen, device="cuda", dtype=torch.bfloat16)
    y = selective_scan_fn(**args, delta_softplus=True)

    def run():
        torch.autograd.grad(y, leaves, dy, retain_graph=True)
direction = "forward" if opts.forward else "backward"
for version in opts.versions.split(","):
    with sscan_version("FWD" if opts.forward else "BWD", version):
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                run()
            torch.cuda.synchronize()
    print(f"== {direction} {version}, b{opts.batch} L{opts.seqlen}, 5 calls", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70), flush=True)
