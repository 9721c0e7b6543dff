"""Bitwise comparison of the mixer scan's outputs and gradients across builds of one tree (compile-time variants that
must only reschedule, e.g. the carry pre-pass's pipelined schedule): `dump` runs fixed-seed cases and saves every
output and gradient; `compare` checks two dumps for exact equality.

    python3 scripts/diag/scan_grad_dump.py dump OUT.pt      (in each build's tree, on the device)
    python3 scripts/diag/scan_grad_dump.py compare A.pt B.pt
Cases: the bar shape at batch 1 / 2 / 3 with ragged lengths and forced sequence splits (APRIEL_SCAN_BWD_SEGMENTS),
including segments of 1-3 tiles, where groups of the carry pre-pass have no tiles; packed documents of 2-450
tokens (so that starts land on every token offset of a tile, and a conv halo spans up to 3 documents).
"""
import os
import sys

import torch

CASES = ((1, 8192, "auto"), (1, 4097, "5"), (2, 1000, "7"), (3, 777, "4"), (1, 130, "3"), (2, 2049, "auto"))
# packed documents (session 13: the v7 backward's document masks): (batch, seqlen, segments, mean document length)
PACKED_CASES = ((1, 4097, "auto", 40), (2, 1000, "3", 10), (8, 1024, "auto", 300), (3, 777, "4", 4))


def dump(path):
    from scan_case import KW, documents, make_case  # scripts/diag (this script's directory is on sys.path)

    from apriel_kernels import mixer_scan

    out = {}
    for b, L, segments, mean in [c + (0,) for c in CASES] + list(PACKED_CASES):
        torch.manual_seed(1000 * b + L)
        args, dy = make_case(b, L, requires_grad=True)
        os.environ["APRIEL_SCAN_BWD_SEGMENTS"] = segments
        if segments == "auto":
            del os.environ["APRIEL_SCAN_BWD_SEGMENTS"]
        kw = dict(KW, seq_idx=documents(b, L, mean)) if mean else KW
        y = mixer_scan(**args, **kw)
        grads = torch.autograd.grad(y, list(args.values()), dy)
        out[f"b{b}_L{L}_s{segments}" + (f"_docs{mean}" if mean else "")] = [y.detach().cpu()] + [g.cpu() for g in grads]
    os.environ.pop("APRIEL_SCAN_BWD_SEGMENTS", None)
    torch.save(out, path)
    print(f"dumped {len(out)} cases to {path}")


def compare(path_a, path_b):
    a, b = torch.load(path_a), torch.load(path_b)
    bad = 0
    for key in a:
        for i, (ta, tb) in enumerate(zip(a[key], b[key])):
            same = torch.equal(ta, tb)
            if not same:
                bad += 1
                diff = (ta.float() - tb.float()).abs().max().item()
                print(f"{key} tensor {i}: DIFFERENT (max abs diff {diff:.3e})")
    print(f"compare {path_a} {path_b}: {'bitwise equal' if bad == 0 else f'{bad} tensors differ'}")
    return bad


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        dump(sys.argv[2])
    else:
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)
