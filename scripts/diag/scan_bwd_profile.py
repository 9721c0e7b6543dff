"""CUDA kernel time table of one mixer scan fwd+bwd at the issue's shape (torch profiler), to see where the time
outside the scan kernels goes (the host epilogue: dt_proj GEMMs, sums, copies).

    python3 scripts/diag/scan_bwd_profile.py B L [--packed] [--json OUT]

--packed: packed documents of ~1,000 tokens (scan_case.documents), the distill module's default layout.
"""
import json
import os
import sys

import torch
from scan_case import KW, documents, make_case  # scripts/diag (this script's directory is on sys.path)
from torch.profiler import ProfilerActivity, profile

from apriel_kernels import mixer_scan

b, L = int(sys.argv[1]), int(sys.argv[2])
args, dy = make_case(b, L, requires_grad=True)
packed = "--packed" in sys.argv
kw = dict(KW, seq_idx=documents(b, L)) if packed else KW


def step():
    y = mixer_scan(**args, **kw)
    torch.autograd.grad(y, list(args.values()), dy)


for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
rows = sorted(((e.key, e.device_time_total / 5 / 1000.0, e.count // 5) for e in prof.key_averages()),
              key=lambda r: -r[1])
total = sum(r[1] for r in rows)
print(f"b{b} L{L}{' packed' if packed else ''}: CUDA time per fwd+bwd {total:.3f} ms")
for name, ms, n in rows[:25]:
    print(f"{ms:8.3f} ms  x{n:<3d} {name[:110]}")
if "--json" in sys.argv:
    with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
        json.dump({"batch": b, "seqlen": L, "packed": packed, "total_ms": total, "kernels": [{"name": r[0], "ms": r[1], "count": r[2]} for r in rows],
                   "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "commit": os.environ.get("APRIEL_BENCH_COMMIT", "?")}, f, indent=1)
