"""Kernel table (torch profiler, CUDA time) of one backward of the generic selective scan (mamba's channel-major
`selective_scan_fn`, bf16, d_state 16, d_inner 4096: bench.kernels_sscan's inputs) per backward version: where the
time goes besides the scan kernel (dy's copy, the partial sums, the casts). Session 26.
    python3 scripts/diag/sscan_bwd_profile.py [--batch 8] [--seqlen 4096] [--versions v2,v7]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from apriel_kernels import selective_scan_fn
from bench.kernels_sscan import D, _inputs
from bench.variants import env_override

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--seqlen", type=int, default=4096)
parser.add_argument("--versions", default="v2,v7")
opts = parser.parse_args()

args = _inputs(opts.batch, opts.seqlen, channel_major=True, requires_grad=True)
leaves = list(args.values())
dy = torch.randn(opts.batch, D, opts.seqlen, device="cuda", dtype=torch.bfloat16)
y = selective_scan_fn(**args, delta_softplus=True)
for version in opts.versions.split(","):
    with env_override("APRIEL_SSCAN_BWD", version):
        for _ in range(3):
            torch.autograd.grad(y, leaves, dy, retain_graph=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                torch.autograd.grad(y, leaves, dy, retain_graph=True)
            torch.cuda.synchronize()
    print(f"== backward {version}, b{opts.batch} L{opts.seqlen}, 5 calls", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70), flush=True)
