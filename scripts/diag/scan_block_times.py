"""How evenly the v7 forward's blocks progress: per block, global-timer stamps at its tile 2, at 1/4, 1/2 and 3/4 of
its tiles and at its end, which the kernel writes over y's first row when the extension is built with
-DAPRIEL_SCAN_BLOCK_TIMES (scan_common.cuh; a diagnostic build only). Run on the device after such a build:

    APRIEL_SCAN_BLOCK_TIMES_BUILD=1 python3 scripts/diag/scan_block_times.py B L [--json OUT]

It runs the bar-shape forward (scan_case.py) in a child process: 0.5 s of warm-up launches, then 20 timed by CUDA
events (event_p50_ms; without APRIEL_SCAN_BLOCK_TIMES_BUILD=1 only that), then one launch whose stamps it reads. It
reports the kernel span, the blocks' durations (min / median / max), per SM the spread of the end times, the mean
resident warps over the span (the ncu "achieved active warps" analogue), the share of the SM-time lost to the tail
(blocks already done while others on the SM still run), and the quarter times by a block's end rank on its SM.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

WARPS_PER_BLOCK = 4


def child(b, L):
    import torch

    import scan_case
    from apriel_kernels import mixer_scan

    args, _ = scan_case.make_case(b, L)
    run = lambda: mixer_scan(**args, **scan_case.KW)  # noqa: E731
    with torch.no_grad():
        deadline = time.perf_counter() + 0.5  # warm clocks
        while time.perf_counter() < deadline:
            run()
            torch.cuda.synchronize()
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    print(f"TIME_MS {statistics.median(times):.4f}", flush=True)
    if os.environ.get("APRIEL_SCAN_BLOCK_TIMES_BUILD") != "1":
        return
    with torch.no_grad():
        y = run()
    torch.cuda.synchronize()
    # block (bx, by) wrote 6 int64 words over y[by, 0, 64 bx : 64 bx + 24] (scan_common.cuh block_time_mark / _end)
    words = y[:, 0, :].contiguous().view(torch.int64).view(b, -1, 16)[:, :, :6].cpu().tolist()
    for by, row in enumerate(words):
        for bx, w in enumerate(row):
            print(f"BT {w[5] >> 32} {bx} {by} {w[0]} {w[1]} {w[2]} {w[3]} {w[4]} {w[5] & 0xffffffff}")


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
    quarters = defaultdict(list)  # (rows: smid, block.x, block.y, start, 1/4, 1/2, 3/4, end in ns from t0, warp slot)
    for v in by_sm.values():
        for rank, r in enumerate(sorted(v, key=lambda r: r[7])):
            marks = [r[3], r[4], r[5], r[6], r[7]]
            quarters[rank].append([(marks[i + 1] - marks[i]) / 1e3 for i in range(4)])
    # what a block's duration goes with: its data (block.x = heads, block.y = sequence), its SM, its warp slot
    order = sorted(range(len(rows)), key=lambda i: dur[i])
    slow, fast = [rows[i] for i in order[-len(rows) // 4:]], [rows[i] for i in order[:len(rows) // 4]]
    return {
        "slowest_quarter_mean_bx_by_slot": [statistics.mean(r[k] for r in slow) for k in (1, 2, 8)],
        "fastest_quarter_mean_bx_by_slot": [statistics.mean(r[k] for r in fast) for k in (1, 2, 8)],
        "rows": [r[:3] + [r[3] - t0, r[4] - t0, r[5] - t0, r[6] - t0, r[7] - t0, r[8]] for r in rows],
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
    time_ms = float(next(ln.split()[1] for ln in out.splitlines() if ln.startswith("TIME_MS ")))
    res = dict(b=o.b, L=o.L, event_p50_ms=time_ms)
    if lines:
        res.update(analyse(lines, len(lines)))
    print(json.dumps(res, indent=1))
    if o.json:
        Path(o.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
