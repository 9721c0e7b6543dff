"""What packed documents (seq_idx: the distill module's default "pack" layout) cost the mixer scan at the bar shapes:
forward and fwd+bwd p50 with and without seq_idx (documents of ~1,000 tokens), bf16, D 4096: the gap a training run
with packing sees against the bar rows (session 13: the v7 forward and backward take documents; the batch-1 forward
with documents is still v5's cp.async kernel). Run on the device after the extension is built:
    python3 scripts/diag/scan_packed_time.py [--json OUT]
"""
import argparse
import json
import os

import torch
from scan_case import KW, documents, make_case  # scripts/diag (this script's directory is on sys.path)

from apriel_kernels import mixer_scan
from bench.timing import time_ms

parser = argparse.ArgumentParser()
parser.add_argument("--json")
opts = parser.parse_args()


rows = []
for b, L in ((1, 8192), (8, 4096)):
    args, dy = make_case(b, L, requires_grad=True)
    seq = documents(b, L)
    for packed in (False, True):
        kw = dict(KW, seq_idx=seq) if packed else KW
        with torch.no_grad():
            fwd = time_ms(lambda: mixer_scan(**args, **kw), rep_ms=150)["p50"]

        def step():
            y = mixer_scan(**args, **kw)
            torch.autograd.grad(y, list(args.values()), dy)

        both = time_ms(step, rep_ms=300)["p50"]
        rows.append({"batch": b, "seqlen": L, "packed": packed, "documents": int(seq.max()) + 1 if packed else 1,
                     "fwd_p50_ms": fwd, "fwd_bwd_p50_ms": both})
        print(f"b{b} L{L} {'packed' if packed else 'single'}: fwd {fwd:.4f} ms, fwd+bwd {both:.4f} ms", flush=True)
    del args, dy

if opts.json:
    with open(opts.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "commit": os.environ.get("APRIEL_BENCH_COMMIT", "?"), "rows": rows}, f, indent=1)
