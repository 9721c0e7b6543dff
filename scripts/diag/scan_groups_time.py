"""Times the mixer scan (bf16, p50) at teachers' shapes whose heads per x / B group (d_inner / d_xb) is not a multiple
of 4 - where the v7 kernels run with warps that have no head in each group's last block (session 19) - for kernel
versions, to set the dispatch rules between v7 and v5 (forward: APRIEL_SCAN_FWD, eager and CUDA graph) or v7 and v4
(--backward: APRIEL_SCAN_BWD, the backward alone after one forward, eager). Run on the device after the extension is
built:
    python3 scripts/diag/scan_groups_time.py [--backward] [--versions v5,v7,auto] [--batches 1,2,4,8] [--seqlen 4096]
                                             [--shapes NAME,...] [--json OUT] [--device-time] [--packed MEAN]
--packed MEAN: packed documents of MEAN tokens on average (bench.kernels_scan.packed_documents) as seq_idx.
--device-time (with --backward) also sums the backward's CUDA kernel times (JSON: device_ms; graph_p50_ms stays None).
A backward version "v7:S" forces S sequence segments (APRIEL_SCAN_BWD_SEGMENTS; session 20: the split's rule at
the kSpan backward's grids).
"""
import argparse
import json
import os

import torch

import scan_case  # scripts/diag (this script's directory is on sys.path)

from apriel_kernels import mixer_scan
from torch.profiler import ProfilerActivity, profile

from bench.kernels_scan import packed_documents
from bench.timing import time_graph_ms, time_ms
from bench.variants import env_override

# (name, d_inner, d_xb): the mixer of a converted teacher has d_inner = q heads x head_dim, d_xb = kv heads x head_dim
SHAPES = (("smollm2-135m", 576, 192), ("llama-3.2-3b", 3072, 1024), ("qwen2.5-14b", 5120, 1024),
          ("qwen2.5-1.5b", 1536, 256), ("qwen2.5-7b", 3584, 512), ("qwen3-1.7b", 2048, 1024),
          ("smollm2-1.7b", 2048, 2048), ("apriel-15b", 4096, 1024), ("qwen2.5-3b", 2048, 256))


def make_case(b, L, D, X, requires_grad=False):
    """scan_case.make_case at this mixer shape (inputs only) and its keyword arguments."""
    args, _ = scan_case.make_case(b, L, requires_grad, d_inner=D, d_xb=X)
    return args, dict(d_inner=D, d_xb=X, d_state=scan_case.N)


parser = argparse.ArgumentParser()
parser.add_argument("--backward", action="store_true")
parser.add_argument("--versions", default=None, help="default: v5,v7,auto (forward) / v4,v7,auto (--backward)")
parser.add_argument("--batches", default="1,2,4,8")
parser.add_argument("--seqlen", type=int, default=4096)
parser.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
parser.add_argument("--json")
parser.add_argument("--packed", type=int, default=0, help="packed documents of this mean length (0: none)")
parser.add_argument("--device-time", action="store_true",
                    help="--backward: also the summed CUDA kernel time per backward (torch profiler), free of the host "
                         "launch time that dominates eager timing of small shapes")
opts = parser.parse_args()
versions = (opts.versions or ("v4,v7,auto" if opts.backward else "v5,v7,auto")).split(",")
env = "APRIEL_SCAN_BWD" if opts.backward else "APRIEL_SCAN_FWD"

def device_ms(fn, n=10):
    """Summed CUDA kernel time of one call of fn (ms), over n profiled calls."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / n / 1000.0


rows = []
for name, D, X in (s for s in SHAPES if s[0] in opts.shapes.split(",")):
    for batch in (int(v) for v in opts.batches.split(",")):
        args, kw = make_case(batch, opts.seqlen, D, X, requires_grad=opts.backward)
        if opts.packed:
            kw = dict(kw, seq_idx=packed_documents(batch, opts.seqlen, opts.packed))
        line = []
        for version in versions:
            dev = None
            kernel, _, segments = version.partition(":")
            with env_override(env, None if kernel == "auto" else kernel), \
                    env_override("APRIEL_SCAN_BWD_SEGMENTS", segments or None):
                if opts.backward:
                    leaves = list(args.values())
                    y = mixer_scan(**args, **kw)
                    dy = torch.randn_like(y)
                    eager = time_ms(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), rep_ms=150)["p50"]
                    graph = None
                    dev = device_ms(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)) \
                        if opts.device_time else None
                    del y
                else:
                    with torch.no_grad():
                        eager = time_ms(lambda: mixer_scan(**args, **kw), rep_ms=100)["p50"]
                        graph = time_graph_ms(lambda: mixer_scan(**args, **kw))["p50"]
            rows.append({"shape": name, "d_inner": D, "d_xb": X, "heads_per_group": D // X, "batch": batch,
                         "seqlen": opts.seqlen, "packed_mean": opts.packed,
                         "phase": "bwd" if opts.backward else "fwd", "version": version,
                         "eager_p50_ms": eager, "graph_p50_ms": graph, "device_ms": dev})
            line.append(f"{version} {eager if opts.backward else graph:.4f}" +
                        (f" (device {dev:.4f})" if dev is not None else ""))
        print(f"{name:13s} r{D // X} b{batch} L{opts.seqlen}: " + "  ".join(line) +
              (" ms (bwd, eager)" if opts.backward else " ms (fwd, graph)"), flush=True)
        del args

if opts.json:
    with open(opts.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "commit": os.environ.get("APRIEL_BENCH_COMMIT", "?"), "rows": rows}, f, indent=1)
