"""The mixer scan at the issue's bar shape (D 4096 / X 1024 / N 16, bf16), run 3 times for ncu to pick a launch.

    python3 scripts/diag/scan_case.py B L [--backward] [--packed]   (forward only, or forward + backward; --packed:
                                                                     documents(B, L) as seq_idx)

make_case(B, L, requires_grad) builds the inputs, documents(B, L) packed-document ids (also used by
scan_bwd_profile.py and scan_packed_time.py).
"""
import sys

import torch

from apriel_kernels import mixer_scan
from bench.kernels_scan import packed_documents as documents  # noqa: F401 (documents(B, L, mean): seq_idx)

D, X, N, R, W = 4096, 1024, 16, 16, 4
KW = dict(d_inner=D, d_xb=X, d_state=N)


def make_case(b, L, requires_grad=False, d_inner=D, d_xb=X):
    """Random mixer inputs at the bar shape (or another d_inner / d_xb) and a dy (b, L, d_inner)."""
    dev, dt = "cuda", torch.bfloat16
    D, X = d_inner, d_xb  # (this call's shape, under the module's names)
    args = dict(zxbc=torch.randn(b, L, 2 * D + 2 * X, device=dev, dtype=dt),
                dt_low=torch.randn(b, L, R, device=dev, dtype=dt) * 0.5,
                conv_weight=torch.randn(D, W, device=dev, dtype=dt) * 0.5,
                conv_bias=torch.randn(D, device=dev, dtype=dt) * 0.1,
                dt_proj_weight=torch.randn(D, R, device=dev, dtype=dt) * R ** -0.5,
                dt_proj_bias=torch.full((D,), -2.5, device=dev, dtype=dt),
                A_log=torch.log(torch.arange(1, N + 1, device=dev, dtype=torch.float32)).repeat(D, 1),
                D=torch.ones(D, device=dev))
    for v in args.values():
        v.requires_grad_(requires_grad)
    return args, torch.randn(b, L, D, device=dev, dtype=dt)


if __name__ == "__main__":
    b, L = int(sys.argv[1]), int(sys.argv[2])
    backward = "--backward" in sys.argv[3:]
    args, dy = make_case(b, L, backward)
    kw = dict(KW, seq_idx=documents(b, L)) if "--packed" in sys.argv[3:] else KW
    with torch.set_grad_enabled(backward):
        for _ in range(3):
            y = mixer_scan(**args, **kw)
            if backward:
                torch.autograd.grad(y, list(args.values()), dy)
    torch.cuda.synchronize()
