"""Stall reasons of an ncu source-counter CSV (scan_fwd_sass_ncu.sh / scan_bwd_sass_ncu.sh output, *_sass.csv.gz):
totals per stall reason, the opcodes that collect the most samples of each, and the N SASS instructions with the most
samples (index, samples, text, top 3 reasons) - to compare two kernels' profiles (session 14: the v5 forward with and
without documents). Runs anywhere (no GPU):
    python3 scripts/diag/ncu_sass_stalls.py FILE.csv.gz [FILE2.csv.gz ...] [--top N]
"""
import argparse
import collections
import csv
import gzip

parser = argparse.ArgumentParser()
parser.add_argument("files", nargs="+")
parser.add_argument("--top", type=int, default=20)
opts = parser.parse_args()

for path in opts.files:
    with gzip.open(path, "rt") as f:
        rows = list(csv.reader(f))
    header, data = rows[1], rows[2:]  # row 0: the kernel name
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    samples_col = col["Warp Stall Sampling (All Samples)"]
    totals, by_opcode, per_instr = collections.Counter(), collections.defaultdict(collections.Counter), []
    for index, row in enumerate(data):
        text = row[col["Source"]].strip()
        words = text.split()
        opcode = words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "?")
        for reason in reasons:
            value = int(row[col[reason]] or 0)
            totals[reason] += value
            by_opcode[opcode][reason] += value
        per_instr.append((int(row[samples_col] or 0), index, text, row))
    all_samples = sum(s for s, *_ in per_instr)
    print(f"{path}: {all_samples} samples")
    for reason, value in totals.most_common(10):
        top = sorted(by_opcode.items(), key=lambda kv: -kv[1][reason])[:4]
        print(f"  {reason[6:]:20s} {value:7d} {100 * value / max(all_samples, 1):5.1f} %   "
              + ", ".join(f"{op} {c[reason]}" for op, c in top))
    print(f"  top {opts.top} instructions:")
    for samples, index, text, row in sorted(per_instr, reverse=True)[: opts.top]:
        top3 = sorted(((int(row[col[r]] or 0), r[6:]) for r in reasons), reverse=True)[:3]
        print(f"  {index:5d} {samples:6d}  {text[:60]:60s} " + ", ".join(f"{r} {v}" for v, r in top3))
