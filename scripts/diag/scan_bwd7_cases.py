"""Runs the v7 backward (fwd + bwd through the public op) on the shapes of the GPU tests, once per staging
(APRIEL_SCAN_TMA 0 / 1), without the torch profiler - for compute-sanitizer (memcheck / racecheck), which the
tests' profiler-based kernel checks do not run under. Cases: name=b,L,D,X,repeat,width,rank,segments[,cuts...]
(segments 0 = the default split). Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that memcheck sees each tensor as its
own allocation (with the caching allocator an access past a tensor inside the allocator's segment goes unseen).
    compute-sanitizer --tool memcheck --kernel-name kns=mixer_scan python3 scripts/diag/scan_bwd7_cases.py \
        s5=2,1000,256,64,1,3,8,5 docs=2,300,256,64,1,4,16,3,16,128,129,255,257,299
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from test_mixer_scan import make_inputs, packed_seq_idx  # noqa: E402

from apriel_kernels import mixer_scan  # noqa: E402

os.environ["APRIEL_SCAN_BWD"] = "v7"
for spec in sys.argv[1:]:
    name, vals = spec.split("=")
    v = [int(x) for x in vals.split(",")]
    b, L, D, X, repeat, width, rank, segments, cuts = *v[:8], v[8:]
    os.environ["APRIEL_SCAN_BWD_SEGMENTS"] = str(segments) if segments > 0 else ""  # 0: the default split
    for dtype in (torch.bfloat16, torch.float16):
        args, kw = make_inputs(b, L, D, X, dtype=dtype, device="cuda", repeat=bool(repeat), dt_rank=rank, width=width,
                               initial_states=True, seed=31)
        seq = packed_seq_idx(b, L, cuts, "cuda") if cuts else None
        for staging in ("0", "1"):
            os.environ["APRIEL_SCAN_TMA"] = staging
            leaves = {k: t.detach().clone().requires_grad_(True) for k, t in args.items()}
            y, ssm, conv = mixer_scan(**leaves, **kw, seq_idx=seq, return_final_states=True)
            (y.float().square().sum() + ssm.sum() + conv.float().sum()).backward()
            torch.cuda.synchronize()
            print(name, dtype, "tma" if staging == "1" else "cp.async", "ok", flush=True)
