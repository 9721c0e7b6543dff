"""Times the mixer scan forward (bf16, the bar shape of scan_case.py; eager and CUDA-graph p50) for forward versions
at the bar shapes - to compare builds of one tree made with different compile-time settings (session 8 timed the
recurrence front's distance in three builds). Run on the device after the extension is built:
    python3 scripts/diag/scan_fwd_time.py [--versions auto,v5k8] [--shapes 1x8192,2x8192] [--packed] [--label NAME]
                                          [--json OUT]
--packed: also each shape with packed documents (scan_case.documents, seq_idx), rows marked "packed".
"""
import argparse
import json
import os

import torch
from scan_case import KW, documents, make_case  # scripts/diag (this script's directory is on sys.path)

from apriel_kernels import mixer_scan
from bench.timing import time_graph_ms, time_ms
from bench.variants import env_override

SHAPES = ((1, 2048), (1, 8192), (1, 32768), (8, 4096))

parser = argparse.ArgumentParser()
parser.add_argument("--versions", default="auto,v5k8")
parser.add_argument("--shapes", default=",".join(f"{b}x{L}" for b, L in SHAPES), help="BATCHxSEQLEN,...")
parser.add_argument("--packed", action="store_true")
parser.add_argument("--label", default="")
parser.add_argument("--json")
opts = parser.parse_args()

rows = []
for batch, seqlen in (tuple(int(v) for v in shape.split("x")) for shape in opts.shapes.split(",")):
    args, _ = make_case(batch, seqlen)
    for packed in (False, True) if opts.packed else (False,):
        kw = dict(KW, seq_idx=documents(batch, seqlen)) if packed else KW
        for version in opts.versions.split(","):
            with env_override("APRIEL_SCAN_FWD", None if version == "auto" else version), torch.no_grad():
                eager = time_ms(lambda: mixer_scan(**args, **kw), rep_ms=150)["p50"]
                graph = time_graph_ms(lambda: mixer_scan(**args, **kw))["p50"]
            rows.append({"batch": batch, "seqlen": seqlen, "packed": packed, "version": version,
                         "eager_p50_ms": eager, "graph_p50_ms": graph})
            print(f"{opts.label} b{batch} L{seqlen}{' packed' if packed else ''} {version:5s}: eager {eager:.4f} "
                  f"graph {graph:.4f} ms", flush=True)
    del args

if opts.json:
    with open(opts.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "label": opts.label,
                   "commit": os.environ.get("APRIEL_BENCH_COMMIT", "?"), "rows": rows}, f, indent=1)
