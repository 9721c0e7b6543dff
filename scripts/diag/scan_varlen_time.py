"""Varlen scheduling of packed documents (session 17) measured: forward p50 of the mixer scan with documents under
the default dispatch (the device plan picks varlen v7 or the batch-1-3 kernel), with the plan off
(APRIEL_SCAN_VARLEN=0: the session-16 dispatch) and with varlen forced (APRIEL_SCAN_FWD=v7var), across batch,
sequence length and document length (scan_case.documents: lengths uniform in [mean / 2, 3 mean / 2); mean 0 = one
document per sequence). bf16, D 4096 / X 1024 (--dims: another mixer shape, e.g. 3072,1024 for 3 heads per group).
Also fwd+bwd for the default and the plan off where --backward is given.
Run on the device after the extension is built:
    python3 scripts/diag/scan_varlen_time.py [--backward] [--json OUT]
"""
import argparse
import json
import os

import torch
from scan_case import KW, documents, make_case  # scripts/diag (this script's directory is on sys.path)

from apriel_kernels import mixer_scan
from apriel_kernels.mixer_scan import varlen_plan
from bench.timing import time_ms
from bench.variants import env_override

parser = argparse.ArgumentParser()
parser.add_argument("--json")
parser.add_argument("--backward", action="store_true")
parser.add_argument("--shapes", default="1x4096,1x8192,2x8192,3x4096")
parser.add_argument("--means", default="250,500,1000,2000,0")
parser.add_argument("--dims", default=f"{KW['d_inner']},{KW['d_xb']}", help="d_inner,d_xb")
opts = parser.parse_args()
D_, X_ = (int(v) for v in opts.dims.split(","))

# (APRIEL_SCAN_VARLEN, APRIEL_SCAN_FWD) per mode; None = unset
MODES = {"auto": (None, None), "off": ("0", None), "forced": (None, "v7var")}


def with_env(mode, fn):
    varlen, fwd = MODES[mode]
    with env_override("APRIEL_SCAN_VARLEN", varlen), env_override("APRIEL_SCAN_FWD", fwd):
        return fn()


rows = []
for shape in opts.shapes.split(","):
    b, L = (int(v) for v in shape.split("x"))
    args, dy = make_case(b, L, requires_grad=opts.backward, d_inner=D_, d_xb=X_)
    for mean in (int(m) for m in opts.means.split(",")):
        seq = documents(b, L, mean) if mean else torch.zeros(b, L, dtype=torch.int32, device="cuda")
        kw = dict(KW, d_inner=D_, d_xb=X_, seq_idx=seq)
        row = {"d_inner": D_, "d_xb": X_, "batch": b, "seqlen": L, "doc_mean": mean,
               "documents": int((seq[:, 1:] != seq[:, :-1]).sum()) + b,
               "plan_varlen": varlen_plan(seq, D_, d_xb=X_)["varlen"]}
        for mode in MODES:
            with torch.no_grad():
                row[f"fwd_{mode}_p50_ms"] = with_env(mode, lambda: time_ms(lambda: mixer_scan(**args, **kw), rep_ms=150)["p50"])
            if opts.backward and mode != "forced":
                def step():
                    y = mixer_scan(**args, **kw)
                    torch.autograd.grad(y, list(args.values()), dy)
                row[f"fwd_bwd_{mode}_p50_ms"] = with_env(mode, lambda: time_ms(step, rep_ms=300)["p50"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    del args, dy

if opts.json:
    with open(opts.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "commit": os.environ.get("APRIEL_BENCH_COMMIT", "?"), "rows": rows}, f, indent=1)
