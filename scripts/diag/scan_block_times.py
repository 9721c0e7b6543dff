"""How evenly the v7 forward's blocks progress: per block, the global-timer stamps at its start, at 1/4, 1/2 and 3/4
of its tiles and at its end, printed by the kernel when the extension is built with -DAPRIEL_SCAN_BLOCK_TIMES
(scan_common.cuh; a diagnostic build only). Run on the device after such a build:

    python3 scripts/diag/scan_block_times.py B L [--json OUT]

It runs the bar-shape forward (scan_case.py) in a child process, keeps the last launch's lines and reports: the
kernel span, the blocks' durations (min / median / max), per SM the spread of the end times, the mean resident
warps over the span (the ncu "achieved active warps" analogue), and the share of the SM-time lost to the tail
(blocks already done while others on the SM still run).
"""
import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

WARPS_PER_BLOCK = 4


def child(b, L):
    import torch

    import scan_case
    from apriel_kernels import mixer_scan

    args, _ = scan_case.make_case(b, L)
    with torch.no_grad():
        for _ in range(3):
            mixer_scan(**args, **scan_case.KW)
            torch.cuda.synchronize()


def analyse(lines, n_blocks):
    rows = [list(map(int, ln.split()[1:])) for ln in lines]
    rows = rows[-n_blocks:]  # the last launch
    t0 = min(r[3] for r in rows)
    t1 = max(r[7] for r in rows)
    span = t1 - t0
    dur = [r[7] - r[3] for r in rows]
    by_sm = defaultdict(list)
    for r in rows:
        by_sm[r[0]].append(r)
    end_spread = []
    busy = 0.0  # block-ns resident
    for sm_rows in by_sm.values():
        ends = [r[7] for r in sm_rows]
        end_spread.append((max(ends) - min(ends)) / span)
        busy += sum(r[7] - r[3] for r in sm_rows)
    n_sm = len(by_sm)
    # the tail: per SM, block-ns between a block's end and the SM's last end (the slot stays empty)
    tail = sum(max(r[7] for r in v) * len(v) - sum(r[7] for r in v) for v in by_sm.values())
    # per quarter: ns per quarter of the blocks' tiles, by the block's rank of end time on its SM
    quarters = defaultdict(list)
    for v in by_sm.values():
        for rank, r in enumerate(sorted(v, key=lambda r: r[7])):
            marks = [r[3], r[4], r[5], r[6], r[7]]
            quarters[rank].append([(marks[i + 1] - marks[i]) / 1e3 for i in range(4)])
    return {
        "blocks": len(rows), "sms": n_sm, "span_us": span / 1e3,
        "block_us_min_med_max": [min(dur) / 1e3, statistics.median(dur) / 1e3, max(dur) / 1e3],
        "start_spread_us": (max(r[3] for r in rows) - t0) / 1e3,
        "sm_end_spread_frac_med_max": [statistics.median(end_spread), max(end_spread)],
        "mean_warps_per_sm": busy / span / n_sm * WARPS_PER_BLOCK,
        "blocks_per_sm_hist": {k: sum(1 for v in by_sm.values() if len(v) == k) for k in range(1, 9)},
        "tail_frac_of_block_time": tail / busy,
        "quarter_us_by_end_rank": {rank: [statistics.median(q[i] for q in qs) for i in range(4)]
                                   for rank, qs in sorted(quarters.items())},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("b", type=int)
    ap.add_argument("L", type=int)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--json")
    o = ap.parse_args()
    if o.child:
        child(o.b, o.L)
        return
    here = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, __file__, str(o.b), str(o.L), "--child"], capture_output=True, text=True,
                         cwd=here, check=True).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("BT ")]
    if not lines:
        sys.exit("no BT lines: build the extension with -DAPRIEL_SCAN_BLOCK_TIMES (the v7 forward prints them)")
    n_blocks = len(lines) // 3
    res = dict(b=o.b, L=o.L, **analyse(lines, n_blocks))
    print(json.dumps(res, indent=1))
    if o.json:
        Path(o.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
