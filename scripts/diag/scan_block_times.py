"""How evenly the blocks of the bar kernels progress - the v7 forward (not its varlen form), the v5 K = 8 forward and
the v7 backward: per block, global-timer stamps at its tile 2, at 1/4, 1/2 and 3/4 of its tiles and at its end, which
the kernel writes over output rows it has already stored when the extension is built with -DAPRIEL_SCAN_BLOCK_TIMES
(scan_common.cuh; a diagnostic build only). Run on the device after such a build (session 24: build_ab.sh with
bt=-DAPRIEL_SCAN_BLOCK_TIMES, bench/results/s24/block_times/):

    APRIEL_SCAN_BLOCK_TIMES_BUILD=1 python3 scripts/diag/scan_block_times.py B L [--backward] [--json OUT]

It runs the bar-shape forward or backward (scan_case.py; the default dispatch) in a child process: 0.5 s of warm-up
launches, then 20 timed by CUDA events (event_p50_ms; without APRIEL_SCAN_BLOCK_TIMES_BUILD=1 only that), then one
launch whose stamps it reads. It reports the kernel span, the blocks' durations (min / median / max), the slots each
SM used, the mean resident warps over the span (the ncu "achieved active warps" analogue), the share of the slot time
left empty, the SM throughput by blocks running, and the quarter times by a block's end rank on its SM.
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

WARPS_PER_BLOCK = 4  # every stamped kernel runs 128-thread blocks
MAGIC = 0x5A5A5A5A  # the high half of a block's word 6 (scan_common.cuh block_time_end)


def stamps(out, rows, lo_delta):
    """Blocks' stamp words in out[:, rows, :] (int64 words over 16-bit elements): wherever word m holds the magic,
    the block's words 0..3 sit at (row + lo_delta[0], m - 2 - lo_delta[1]) and its words 4..6 at m - 2 .. m.
    Returns "BT smid block sequence tag w0 w1 w2 w3 end slot" lines (block = the lo word's element offset / 16; tag:
    the backward's segment)."""
    import torch

    words = out[:, rows, :].contiguous().view(torch.int64)  # (b, rows, elements / 4)
    hits = ((words >> 32) == MAGIC).nonzero().tolist()
    lines = []
    for b, r, m in hits:
        hi = words[b, r, m - 2:m + 1].tolist()
        lo = out[b, rows[r] + lo_delta[0]].view(torch.int64)[m - 2 - lo_delta[1]:m + 2 - lo_delta[1]].tolist()
        block = (m - 2 - lo_delta[1]) * 4 // 16
        lines.append(f"BT {hi[1] >> 32} {block} {b} {hi[2] & 0xffffffff} {' '.join(map(str, lo))} {hi[0]} "
                     f"{hi[1] & 0xffffffff}")
    return lines


def child(b, L, backward):
    import torch

    import scan_case
    from apriel_kernels import mixer_scan

    args, dy = scan_case.make_case(b, L, requires_grad=backward)
    if backward:
        y = mixer_scan(**args, **scan_case.KW)
        leaves = list(args.values())
        run = lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)  # noqa: E731
    else:
        run = lambda: mixer_scan(**args, **scan_case.KW)  # noqa: E731
    with torch.set_grad_enabled(backward):
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
        print(f"TIME_MS {statistics.median(times):.4f}\nGPU {torch.cuda.get_device_name()}\nTORCH {torch.__version__}",
              flush=True)
        if os.environ.get("APRIEL_SCAN_BLOCK_TIMES_BUILD") != "1":
            return
        out = run()
        torch.cuda.synchronize()
    # where each kernel writes its stamps (scan_common.cuh block_time_mark / _end):
    if backward:  # bwd7: dz of its segment's last row, z channels 64 block .. (words 0..3), + 16 (words 4..6)
        rows = sorted({t for t in range(L) if (t + 1) % 32 == 0 or t == L - 1})
        lines = stamps(out[0][:, :, :scan_case.D], rows, (0, 4))
    else:  # v7: y row 0 as bwd7; v5 K = 8: y row 0 channels 16 block .. (words 0..3), row 1 (words 4..6)
        lines = stamps(out, [0], (0, 4)) or stamps(out, [1], (-1, 0))
    print("\n".join(lines))


def analyse(lines):
    """The timeline of one launch from its blocks' lines (see stamps)."""
    SM, BLOCK, SEQ, TAG, START, END, SLOT = 0, 1, 2, 3, 4, 8, 9
    rows = [list(map(int, ln.split()[1:])) for ln in lines]
    t0 = min(r[START] for r in rows)
    span = max(r[END] for r in rows) - t0
    dur = [r[END] - r[START] for r in rows]
    by_sm = defaultdict(list)
    for r in rows:
        by_sm[r[SM]].append(r)
    n_sm = len(by_sm)
    busy = sum(dur)  # block-ns resident (from tile 2)
    # per SM: the most blocks at once (the slots the grid used) and the block-ns those slots stood empty before the
    # SM's last end (the tail and any wave gaps)
    slots, idle = [], 0
    for v in by_sm.values():
        events = sorted([(r[START], 1) for r in v] + [(r[END], -1) for r in v])
        n = most = 0
        for _, d in events:
            n += d
            most = max(most, n)
        slots.append(most)
        idle += most * (max(r[END] for r in v) - min(r[START] for r in v)) - sum(r[END] - r[START] for r in v)
    # SM throughput by blocks running at once: quarters of a block's tiles per ms, and the time spent so
    rate, spent = defaultdict(float), defaultdict(float)
    for v in by_sm.values():
        segs = [(r[START + i], r[START + i + 1]) for r in v for i in range(4)]
        cuts = sorted({t for s in segs for t in s})
        for a, b in zip(cuts, cuts[1:]):
            act = [s for s in segs if s[0] <= (a + b) / 2 < s[1]]
            rate[len(act)] += sum((b - a) / (s[1] - s[0]) for s in act)
            spent[len(act)] += b - a
    quarters = defaultdict(list)  # per block's end rank on its SM: us per quarter of its tiles
    for v in by_sm.values():
        for rank, r in enumerate(sorted(v, key=lambda r: r[END])):
            quarters[rank].append([(r[START + i + 1] - r[START + i]) / 1e3 for i in range(4)])
    order = sorted(range(len(rows)), key=lambda i: dur[i])
    slow, fast = [rows[i] for i in order[-len(rows) // 4:]], [rows[i] for i in order[:len(rows) // 4]]
    return {
        "blocks": len(rows), "sms": n_sm, "segments": len({r[TAG] for r in rows}), "span_us": span / 1e3,
        "block_us_min_med_max": [min(dur) / 1e3, statistics.median(dur) / 1e3, max(dur) / 1e3],
        "slots_per_sm_hist": {k: slots.count(k) for k in sorted(set(slots))},
        "blocks_per_sm_hist": {k: sum(1 for v in by_sm.values() if len(v) == k)
                               for k in sorted({len(v) for v in by_sm.values()})},
        "mean_warps_per_sm": busy / span / n_sm * WARPS_PER_BLOCK,
        "idle_slot_frac": idle / (idle + busy),
        "sm_rate_quarters_per_ms_by_running": {n: rate[n] / spent[n] * 1e6 for n in sorted(rate) if n},
        "sm_us_by_running": {n: spent[n] / n_sm / 1e3 for n in sorted(spent) if n},
        "quarter_us_by_end_rank": {rank: [statistics.median(q[i] for q in qs) for i in range(4)]
                                   for rank, qs in sorted(quarters.items())},
        "slowest_quarter_mean_block_seq_slot": [statistics.mean(r[k] for r in slow) for k in (BLOCK, SEQ, SLOT)],
        "fastest_quarter_mean_block_seq_slot": [statistics.mean(r[k] for r in fast) for k in (BLOCK, SEQ, SLOT)],
        "rows (smid, block, sequence, tag, tile 2, 1/4, 1/2, 3/4, end in ns from the first tile 2, slot)":
            [r[:START] + [t - t0 for t in r[START:END + 1]] + [r[SLOT]] for r in rows],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("b", type=int)
    ap.add_argument("L", type=int)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--backward", action="store_true", help="the backward alone (the v7 backward's stamps)")
    ap.add_argument("--json")
    o = ap.parse_args()
    if o.child:
        child(o.b, o.L, o.backward)
        return
    here = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, __file__, str(o.b), str(o.L), "--child"] + ["--backward"] * o.backward,
                         capture_output=True, text=True, cwd=here, check=True).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("BT ")]
    time_ms = float(next(ln.split()[1] for ln in out.splitlines() if ln.startswith("TIME_MS ")))
    res = dict(b=o.b, L=o.L, phase="bwd" if o.backward else "fwd", event_p50_ms=time_ms,
               gpu=next(ln[4:] for ln in out.splitlines() if ln.startswith("GPU ")),
               torch=next(ln[6:] for ln in out.splitlines() if ln.startswith("TORCH ")),
               commit=os.environ.get("APRIEL_BENCH_COMMIT", "?"),
               build="-DAPRIEL_SCAN_BLOCK_TIMES" if lines else "default")
    if lines:
        res.update(analyse(lines))
    print(json.dumps(res, indent=1))
    if o.json:
        Path(o.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
