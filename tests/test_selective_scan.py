"""apriel::selective_scan_fwd / _bwd and the mamba-compatible selective_scan_fn (CPU reference path).

The CUDA kernel of this op is not written yet (issue 3, item 3): on a GPU the op needs
APRIEL_KERNELS_ALLOW_REFERENCE=1; these tests cover the op contract on CPU.
"""
from __future__ import annotations

import pytest
import torch

from apriel_kernels import selective_scan, selective_scan_fn
from apriel_kernels.reference.selective_scan import selective_scan_sequential_ref
from apriel_kernels.selective_scan import selective_scan_bwd, selective_scan_fwd

N = 16


def make(batch=2, seqlen=13, d_inner=64, du=None, gb=2, gc=4, dtype=torch.float64, seed=0):
    """Fresh random token-major inputs (never zeros) with realistic delta and A scales."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = dict(
        u=rnd(batch, seqlen, du or d_inner).to(dtype),
        delta=(rnd(batch, seqlen, d_inner) - 2.0).to(dtype),
        A=-torch.exp(0.3 * rnd(d_inner, N)).to(torch.float64 if dtype == torch.float64 else torch.float32),
        B=rnd(batch, seqlen, gb, N).to(dtype),
        C=rnd(batch, seqlen, gc, N).to(dtype),
        D=rnd(d_inner).to(torch.float64 if dtype == torch.float64 else torch.float32),
        z=rnd(batch, seqlen, d_inner).to(dtype),
        delta_bias=(0.1 * rnd(d_inner)).to(torch.float64 if dtype == torch.float64 else torch.float32),
    )
    return args


@pytest.mark.parametrize("grouped_u", [False, True], ids=["u_full", "u_grouped"])
@pytest.mark.parametrize("packed", [False, True], ids=["single", "packed"])
def test_matches_sequential_loop(grouped_u, packed):
    args = make(du=16 if grouped_u else None)
    h0 = torch.randn(2, 64, N, dtype=torch.float64)
    seq = None
    if packed:
        seq = torch.zeros(2, 13, dtype=torch.int32)
        seq[:, 5:] = 1
        seq[1, 9:] = 2
    y, final = selective_scan(**args, delta_softplus=True, initial_state=h0, seq_idx=seq, return_final_state=True)
    y_ref, h_ref = selective_scan_sequential_ref(**args, delta_softplus=True, initial_state=h0, seq_idx=seq)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, h_ref, rtol=1e-10, atol=1e-10)


def test_selective_scan_fn_is_the_channel_major_view():
    args = make(gb=1, gc=1)
    cm = dict(u=args["u"].transpose(1, 2), delta=args["delta"].transpose(1, 2), A=args["A"],
              B=args["B"][:, :, 0].transpose(1, 2), C=args["C"][:, :, 0].transpose(1, 2), D=args["D"],
              z=args["z"].transpose(1, 2), delta_bias=args["delta_bias"])
    y, last = selective_scan_fn(**cm, delta_softplus=True, return_last_state=True)
    y_tm, last_tm = selective_scan(**args, delta_softplus=True, return_final_state=True)
    torch.testing.assert_close(y, y_tm.transpose(1, 2))
    torch.testing.assert_close(last, last_tm)


def test_gradcheck_float64():
    args = make(batch=1, seqlen=4, d_inner=16, gb=1, gc=1)
    names = list(args)
    leaves = [args[k].clone().requires_grad_(True) for k in names]
    h0 = torch.randn(1, 16, N, dtype=torch.float64, requires_grad=True)

    def f(*ts):
        return selective_scan(**dict(zip(names, ts[:-1])), delta_softplus=True, initial_state=ts[-1],
                               return_final_state=True)

    assert torch.autograd.gradcheck(f, [*leaves, h0], eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_opcheck_and_compile():
    args = make(dtype=torch.float32)
    pos = [args["u"], args["delta"], args["A"], args["B"], args["C"], args["D"], args["z"], args["delta_bias"], True,
           None, None]
    torch.library.opcheck(selective_scan_fwd, pos)
    y = selective_scan_fwd(*pos)[0]
    torch.library.opcheck(selective_scan_bwd, pos + [torch.randn_like(y), None])
    f = torch.compile(lambda a: selective_scan(**a, delta_softplus=True), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(args), selective_scan(**args, delta_softplus=True))


def test_errors_name_the_argument():
    args = make(dtype=torch.float32)
    with pytest.raises(ValueError, match="u"):
        selective_scan(**{**args, "u": args["u"][..., :7]})
    with pytest.raises(ValueError, match="B"):
        selective_scan(**{**args, "B": torch.randn(2, 13, 3, N)})
    with pytest.raises(TypeError, match="z"):
        selective_scan(**{**args, "z": args["z"].double()})
    with pytest.raises(ValueError, match="B, C"):
        selective_scan_fn(args["u"].transpose(1, 2), args["delta"].transpose(1, 2), args["A"], torch.randn(N, 13),
                          torch.randn(N, 13))
