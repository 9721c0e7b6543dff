"""apriel::selective_scan_fwd / _bwd and the mamba-compatible selective_scan_fn.

CPU: the op contract on the reference path (vs a naive float64 loop, gradcheck, opcheck, compile, errors).
GPU (@gpu): the CUDA kernels of csrc/sscan/ vs the float64 reference (outputs and every gradient, three
layouts, grouped u, GB != GC, d_state 4 / 16 / 40 / 64, packed, initial states), packed == separate, split
continuity, determinism, opcheck, torch.compile(fullgraph=True), CUDA-graph capture, unsupported-shape errors.
"""
from __future__ import annotations

import pytest
import torch

from apriel_kernels import selective_scan, selective_scan_fn
from apriel_kernels.reference.selective_scan import selective_scan_ref, selective_scan_sequential_ref
from apriel_kernels.selective_scan import selective_scan_bwd, selective_scan_fwd
from conftest import require_cuda_kernel

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
    for save in (False, True):  # the reference path returns no checkpoints either way
        torch.library.opcheck(selective_scan_fwd, pos + [save])
        y, _, ckpt = selective_scan_fwd(*pos, save)
        assert ckpt.numel() == 0
    torch.library.opcheck(selective_scan_bwd, pos + [torch.randn_like(y), None, None])
    f = torch.compile(lambda a: selective_scan(**a, delta_softplus=True), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(args), selective_scan(**args, delta_softplus=True))
    # with grads: the forward is asked for checkpoints (a third, non-differentiable output) under AOT autograd
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    f(leaves).sum().backward()
    ref = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    selective_scan(**ref, delta_softplus=True).sum().backward()
    for k in args:
        torch.testing.assert_close(leaves[k].grad, ref[k].grad)


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


# ------------------------------------------------------------------------------------------------ GPU
# The CUDA kernels of csrc/sscan/ against the float64 reference. Inputs are stored token-major ("tm"),
# channel-major like mamba-ssm's selective_scan_fn ("cm": u / delta / z (b, D, L), B / C (b, G, N, L)), or as
# slices of NaN-filled wider buffers ("nan": reading outside the slice poisons the result).
gpu = pytest.mark.gpu
needs_kernel = require_cuda_kernel("selective_scan_fwd")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DT_IDS = ["bf16", "fp16", "fp32"]
ACTS = ("u", "delta", "B", "C", "z")
PARAMS = ("A", "D", "delta_bias", "initial_state")


def poison_allocator(nbytes=256 << 20):
    """Fill the caching allocator's free blocks with NaN so an output the kernel forgets to write is NaN."""
    t = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del t


def cuda_kernels(fn):
    """(fn(), the names of the CUDA kernels it launched), through the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, [e.key for e in prof.key_averages()]


def store(value: torch.Tensor, layout: str):
    """(base tensor in the layout, fn base -> the token-major logical view). value: (b, L, C) or (b, L, G, N)."""
    if layout == "tm":
        return value.contiguous(), lambda t: t
    if layout == "cm":
        perm = (0, 2, 1) if value.dim() == 3 else (0, 2, 3, 1)
        inv = (0, 2, 1) if value.dim() == 3 else (0, 3, 1, 2)
        return value.permute(*perm).contiguous(), lambda t: t.permute(*inv)
    width = value.shape[-1]
    base = torch.full((*value.shape[:-1], width + 5), float("nan"), dtype=value.dtype, device=value.device)
    base[..., 2:2 + width] = value
    return base, lambda t: t[..., 2:2 + width]


def make_cuda_case(batch, seqlen, d_inner, du, gb, gc, d_state, dtype, extras="", seed=0):
    """Token-major logical inputs (rounded to dtype, realistic delta / A scales, never zeros) + seq_idx."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float64)  # noqa: E731
    pdt = torch.float32
    args = dict(
        u=rnd(batch, seqlen, du or d_inner).to(dtype),
        delta=(rnd(batch, seqlen, d_inner) - 2.0).to(dtype),
        A=-torch.exp(0.3 * rnd(d_inner, d_state)).to(pdt),
        B=rnd(batch, seqlen, gb, d_state).to(dtype),
        C=rnd(batch, seqlen, gc, d_state).to(dtype),
        D=rnd(d_inner).to(pdt),
        z=rnd(batch, seqlen, d_inner).to(dtype),
        delta_bias=(0.1 * rnd(d_inner)).to(pdt),
        initial_state=rnd(batch, d_inner, d_state).to(pdt) if "init" in extras else None,
    )
    seq = None
    if "packed" in extras:
        seq = torch.zeros(batch, seqlen, dtype=torch.int32, device="cuda")
        for cut in (seqlen // 3, (2 * seqlen) // 3 + 1):
            if 0 < cut < seqlen:
                seq[:, cut:] += 1
        if batch > 1 and seqlen > 4:
            seq[1, seqlen // 2:] += 1  # sequences of a batch need not share boundaries
    return args, seq


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check(name, out, ref64, ref_lp, k=2.0, floor=1e-5):
    """|out - ref64| <= k |ref_lp - ref64| + floor * max|ref64|  (PyTorch's own low-precision error as scale)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    scale = ref64.abs().max().item() + 1e-30
    e, e_lp = err(out, ref64), err(ref_lp, ref64)
    assert e <= k * e_lp + floor * scale, f"{name}: err {e:.3e} > {k} x torch low-prec err {e_lp:.3e} + {floor:.0e} x {scale:.3e}"


def _run(args, seq, layout, leaves=False):
    """The CUDA op on args stored in `layout`; returns (y, final, bases) (bases: the tensors holding the data)."""
    bases, views = {}, {}
    for k, v in args.items():
        if v is None:
            continue
        if k in ACTS:
            base, view = store(v, layout)
        else:
            base, view = v.clone(), (lambda t: t)
        if leaves:
            base.requires_grad_(True)
        bases[k], views[k] = base, view
    call = {k: views[k](bases[k]) for k in bases}
    y, final = selective_scan(**call, delta_softplus=True, seq_idx=seq, return_final_state=True)
    return y, final, bases, views


def _ref(args, seq, f64):
    conv = {k: (v.double() if f64 else v) if v is not None else None for k, v in args.items()}
    return conv, selective_scan_ref(**conv, delta_softplus=True, seq_idx=seq, return_final_state=True)


def _tol(dtype, grad=False):
    if dtype == torch.float32:
        return 5e-5 if grad else 2e-5
    return 2e-3 if grad else 1e-3


FWD_CASES = [
    # (batch, seqlen, d_inner, du, GB, GC, d_state, layout, extras)
    (1, 1, 64, None, 1, 4, 16, "tm", ""),
    (3, 2, 64, 16, 2, 4, 16, "cm", "init"),
    (1, 63, 256, 64, 4, 16, 16, "nan", ""),
    (3, 65, 64, None, 1, 1, 16, "cm", "packed_init"),
    (1, 2049, 256, None, 1, 1, 16, "cm", ""),
    (2, 100, 40, None, 40, 5, 16, "tm", "init"),
    (2, 70, 64, None, 1, 2, 4, "nan", "packed"),
    (1, 45, 32, None, 2, 2, 40, "cm", "packed_init"),
    (2, 33, 64, None, 1, 1, 64, "tm", "init"),
    (2, 300, 4096, None, 1, 1, 16, "cm", ""),
    # channel-major with L % 8 == 0: the forward v2's 16-byte cp.async path (ragged last tile, partial copies)
    (2, 1000, 64, None, 1, 1, 16, "cm", "packed_init"),
    (1, 264, 128, 32, 2, 2, 16, "cm", "init"),
]
CASE_ID = lambda c: f"b{c[0]}-L{c[1]}-D{c[2]}-Du{c[3] or c[2]}-GB{c[4]}-GC{c[5]}-N{c[6]}-{c[7]}-{c[8] or 'plain'}"  # noqa: E731


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", FWD_CASES, ids=CASE_ID)
def test_cuda_forward_parity(case, dtype):
    b, L, d, du, gb, gc, n, layout, extras = case
    args, seq = make_cuda_case(b, L, d, du, gb, gc, n, dtype, extras)
    poison_allocator()
    y, final, _, _ = _run(args, seq, layout)
    _, (y64, f64) = _ref(args, seq, True)
    _, (ylp, flp) = _ref(args, seq, False)
    assert y.dtype == dtype and final.dtype == torch.float32 and y.is_contiguous()
    check("y", y, y64, ylp, floor=_tol(dtype))
    check("final_state", final, f64, flp, floor=_tol(dtype))


GRAD_CASES = [
    (1, 1, 64, None, 1, 4, 16, "tm", "init"),
    (2, 63, 64, 16, 2, 4, 16, "cm", "init"),
    (3, 65, 64, None, 1, 1, 16, "nan", "packed_init"),
    (2, 100, 40, None, 40, 5, 16, "cm", "init"),
    (1, 45, 32, None, 2, 2, 40, "tm", "packed_init"),
    (1, 2049, 64, None, 1, 1, 16, "cm", ""),
    (2, 264, 64, None, 1, 1, 16, "cm", "packed_init"),
]


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", GRAD_CASES, ids=CASE_ID)
def test_cuda_gradient_parity(case, dtype):
    _gradient_parity(case, dtype)


def _gradient_parity(case, dtype):
    """Every gradient vs float64 (3 x torch's own low-precision error + a floor); returns them (token-major views)."""
    b, L, d, du, gb, gc, n, layout, extras = case
    args, seq = make_cuda_case(b, L, d, du, gb, gc, n, dtype, extras)
    if "noz" in extras:
        args["z"] = None
    gen = torch.Generator(device="cuda").manual_seed(1)
    w_y = torch.randn(b, L, d, device="cuda", generator=gen, dtype=torch.float64).to(dtype).double()
    w_f = torch.randn(b, d, n, device="cuda", generator=gen, dtype=torch.float64)
    poison_allocator()
    y, final, bases, views = _run(args, seq, layout, leaves=True)
    ((y.double() * w_y).sum() + (final.double() * w_f).sum()).backward()
    got = {k: views[k](bases[k].grad) for k in bases}
    refs = []
    for f64 in (True, False):
        leaves = {k: (v.detach().double() if f64 else v.detach()).clone().requires_grad_(True) if v is not None else None
                  for k, v in args.items()}
        y_r, f_r = selective_scan_ref(**leaves, delta_softplus=True, seq_idx=seq, return_final_state=True)
        ((y_r.double() * w_y).sum() + (f_r.double() * w_f).sum()).backward()
        refs.append({k: v.grad for k, v in leaves.items() if v is not None})
    for k in got:
        assert got[k].dtype == args[k].dtype, f"d{k}: dtype {got[k].dtype}"
        check(f"d{k}", got[k], refs[0][k], refs[1][k], k=3.0, floor=_tol(dtype, grad=True))
    return got


@gpu
@needs_kernel
def test_cuda_selective_scan_fn_mamba_layouts():
    """selective_scan_fn with (b, N, L) and (b, G, N, L) B / C == the token-major op; y (b, D, L)."""
    args, _ = make_cuda_case(2, 77, 64, None, 1, 4, 16, torch.bfloat16)
    cm = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731
    B3 = args["B"][:, :, 0].transpose(1, 2).contiguous()
    C4 = args["C"].permute(0, 2, 3, 1).contiguous()
    y, last = selective_scan_fn(cm(args["u"]), cm(args["delta"]), args["A"], B3, C4, args["D"], cm(args["z"]),
                                args["delta_bias"], delta_softplus=True, return_last_state=True)
    tm = {**args, "B": args["B"][:, :, :1]}
    tm.pop("initial_state")
    y_tm, last_tm = selective_scan(**tm, delta_softplus=True, return_final_state=True)
    assert y.shape == (2, 64, 77)
    torch.testing.assert_close(y, y_tm.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(last, last_tm, rtol=0, atol=0)


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_packed_equals_separate_and_split_continuity(dtype):
    args, _ = make_cuda_case(1, 150, 64, None, 2, 4, 16, dtype, "init")
    cuts = [0, 37, 101, 150]
    seq = torch.zeros(1, 150, dtype=torch.int32, device="cuda")
    seq[:, 37:] = 1
    seq[:, 101:] = 2
    y_packed, f_packed = selective_scan(**args, delta_softplus=True, seq_idx=seq, return_final_state=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for i, (s, e) in enumerate(zip(cuts[:-1], cuts[1:])):
        part = {k: (v[:, s:e] if k in ACTS else v) for k, v in args.items()}
        if i > 0:
            part["initial_state"] = None
        y_s, f_s = selective_scan(**part, delta_softplus=True, return_final_state=True)
        torch.testing.assert_close(y_packed[:, s:e], y_s, **tol)
    torch.testing.assert_close(f_packed, f_s, rtol=1e-5, atol=1e-5)
    # split continuity: [0, 70) then [70, 150) with the carried state == whole
    y_all, f_all = selective_scan(**args, delta_softplus=True, return_final_state=True)
    a = {k: (v[:, :70] if k in ACTS else v) for k, v in args.items()}
    b = {k: (v[:, 70:] if k in ACTS else v) for k, v in args.items()}
    y_a, f_a = selective_scan(**a, delta_softplus=True, return_final_state=True)
    y_b, f_b = selective_scan(**{**b, "initial_state": f_a}, delta_softplus=True, return_final_state=True)
    torch.testing.assert_close(torch.cat([y_a, y_b], 1), y_all, **tol)
    torch.testing.assert_close(f_b, f_all, rtol=1e-5, atol=1e-5)


@gpu
@needs_kernel
def test_cuda_deterministic():
    args, seq = make_cuda_case(2, 200, 128, None, 1, 8, 16, torch.bfloat16, "packed_init")

    def run():
        leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
        y, f = selective_scan(**leaves, delta_softplus=True, seq_idx=seq, return_final_state=True)
        (y.float().sum() + f.sum()).backward()
        return [y, f] + [leaves[k].grad for k in leaves]

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@gpu
@needs_kernel
def test_cuda_opcheck_compile_and_graph():
    args, seq = make_cuda_case(2, 40, 64, 16, 2, 4, 16, torch.float32, "packed_init")
    pos = [args["u"], args["delta"], args["A"], args["B"], args["C"], args["D"], args["z"], args["delta_bias"], True,
           args["initial_state"], seq]
    for save in (False, True):
        torch.library.opcheck(selective_scan_fwd, pos + [save])
    y, f, ckpt = selective_scan_fwd(*pos, True)
    assert ckpt.shape == (2, 2, 64, 16) and ckpt.dtype == torch.float32  # ceil(40 / 32) tiles
    assert torch.equal(ckpt[:, 0], args["initial_state"])  # the state before the first tile
    dy, df = torch.randn_like(y), torch.randn_like(f)
    torch.library.opcheck(selective_scan_bwd, pos + [dy, df, None])
    torch.library.opcheck(selective_scan_bwd, pos + [dy, df, ckpt])
    # the saved checkpoints and the backward's own rerun give the same gradients
    for a, b in zip(selective_scan_bwd(*pos, dy, df, ckpt), selective_scan_bwd(*pos, dy, df, None)):
        assert torch.equal(a, b)
    fn = torch.compile(lambda a: selective_scan(**a, delta_softplus=True, seq_idx=seq), fullgraph=True)
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    y_c = fn(leaves)
    y_c.sum().backward()
    torch.testing.assert_close(y_c, selective_scan(**args, delta_softplus=True, seq_idx=seq), rtol=0, atol=0)
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())
    # CUDA-graph capture and replay of the forward
    static = {k: v.clone() for k, v in args.items()}
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        selective_scan(**static, delta_softplus=True, seq_idx=seq)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_g = selective_scan(**static, delta_softplus=True, seq_idx=seq)
    static["u"].copy_(torch.randn_like(static["u"]))
    graph.replay()
    torch.testing.assert_close(y_g, selective_scan(**static, delta_softplus=True, seq_idx=seq), rtol=0, atol=0)


@gpu
@needs_kernel
def test_cuda_unsupported_shapes_name_the_argument():
    args, _ = make_cuda_case(1, 8, 64, None, 1, 1, 65, torch.float32)
    with pytest.raises(ValueError, match="d_state"):
        selective_scan(**args)
    args, _ = make_cuda_case(1, 8, 48, None, 2, 1, 16, torch.float32)  # 24 channels per B group
    with pytest.raises(ValueError, match="B"):
        selective_scan(**args)
    args, _ = make_cuda_case(1, 8, 64, None, 1, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="dy"):
        selective_scan_bwd(*[args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")], True, None, None,
                           torch.randn(1, 7, 64, device="cuda"), None, None)
    with pytest.raises(ValueError, match="checkpoints"):
        selective_scan_bwd(*[args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")], True, None, None,
                           torch.randn(1, 8, 64, device="cuda"), None, torch.zeros(1, 2, 64, 16, device="cuda"))


@gpu
@needs_kernel
@pytest.mark.parametrize("extras", ["", "packed_init"])
def test_cuda_forward_variants_agree(extras, monkeypatch):
    """v1's interleaved tile loop (APRIEL_SSCAN_FWD=v1) and its plain loop (=plain) do the same arithmetic: bitwise equal."""
    args, seq = make_cuda_case(2, 77, 64, None, 1, 4, 16, torch.bfloat16, extras)
    monkeypatch.setenv("APRIEL_SSCAN_FWD", "v1")
    y, f, _, _ = _run(args, seq, "cm")
    monkeypatch.setenv("APRIEL_SSCAN_FWD", "plain")
    y_p, f_p, _, _ = _run(args, seq, "cm")
    assert torch.equal(y, y_p) and torch.equal(f, f_p)


@gpu
@needs_kernel
@pytest.mark.parametrize("extras", ["init", "packed_init"])
def test_cuda_backward_variants_agree(extras, monkeypatch):
    """The v1 backward's interleaved tile loops and APRIEL_SSCAN_BWD=plain: bitwise equal gradients."""
    monkeypatch.setenv("APRIEL_SSCAN_BWD", "v1")
    args, seq = make_cuda_case(2, 77, 64, None, 1, 4, 16, torch.bfloat16, extras)

    def grads():
        y, f, bases, views = _run(args, seq, "tm", leaves=True)
        (y.float().sum() + f.sum()).backward()
        return {k: bases[k].grad for k in bases}

    fast = grads()
    monkeypatch.setenv("APRIEL_SSCAN_BWD", "plain")
    plain = grads()
    for k in fast:
        assert torch.equal(fast[k], plain[k]), f"d{k} differs between backward variants"


# Forward v2 (csrc/sscan/sscan_fwd2.cuh: d_state 16, one B / C group per block) at both lane counts, on every
# staging path: token-major 16-byte copies ("tm"), token-fast 16-byte copies with a ragged tail ("cm", L % 8 == 0),
# token-fast plain loads ("cm", other L), plain loads of NaN-padded strided slices ("nan"), grouped u, packed.
V2_CASES = [
    (1, 1, 64, None, 1, 4, 16, "tm", ""),
    (2, 77, 64, None, 1, 1, 16, "tm", "packed_init"),
    (3, 2, 64, 16, 2, 4, 16, "cm", "init"),
    (1, 63, 256, 64, 4, 16, 16, "nan", ""),
    (3, 65, 64, None, 1, 1, 16, "cm", "packed_init"),
    (2, 1000, 64, None, 1, 1, 16, "cm", "packed_init"),
    (1, 264, 128, 32, 2, 2, 16, "cm", "init"),
]


@gpu
@needs_kernel
@pytest.mark.parametrize("variant", ["v2k4", "v2k8", "v2k4-precise", "v2k8-precise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", V2_CASES, ids=CASE_ID)
def test_cuda_forward_v2_parity(case, dtype, variant, monkeypatch):
    """v2 at K = 4 and 8 vs float64, with the fast (default) and the precise softplus; with the precise one its
    states equal v1's (same per-state arithmetic; y differs in the readout's sum order only)."""
    b, L, d, du, gb, gc, n, layout, extras = case
    args, seq = make_cuda_case(b, L, d, du, gb, gc, n, dtype, extras)
    precise = variant.endswith("-precise")
    monkeypatch.setenv("APRIEL_SSCAN_FWD", variant.split("-")[0])
    if precise:
        monkeypatch.setenv("APRIEL_SSCAN_SOFTPLUS", "precise")
    poison_allocator()
    y, final, _, _ = _run(args, seq, layout)
    _, (y64, f64) = _ref(args, seq, True)
    _, (ylp, flp) = _ref(args, seq, False)
    assert y.dtype == dtype and y.is_contiguous()
    check("y", y, y64, ylp, floor=_tol(dtype))
    check("final_state", final, f64, flp, floor=_tol(dtype))
    monkeypatch.setenv("APRIEL_SSCAN_FWD", "v1")
    y1, final1, _, _ = _run(args, seq, layout)
    scale, tol = final1.abs().max().item(), 1e-6 if precise else 1e-4
    torch.testing.assert_close(final, final1, rtol=tol, atol=tol * scale)
    y_tol = (1e-5 if precise else 1e-4) if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), y1.float(), rtol=0, atol=y_tol * y1.abs().max().item())


@gpu
@needs_kernel
@pytest.mark.parametrize("variant", ["v2k4", "v2k8", "v1"])
def test_cuda_gradient_through_forward_variants(variant, monkeypatch):
    """The backward's checkpoint pass runs the selected forward (v2 writes the checkpoints by default)."""
    args, seq = make_cuda_case(2, 264, 64, None, 1, 1, 16, torch.bfloat16, "packed_init")
    monkeypatch.setenv("APRIEL_SSCAN_FWD", variant)
    y, final, bases, views = _run(args, seq, "cm", leaves=True)
    (y.float().sum() + final.sum()).backward()
    got = {k: views[k](bases[k].grad) for k in bases}
    monkeypatch.setenv("APRIEL_SSCAN_FWD", "plain")
    y, final, bases, views = _run(args, seq, "cm", leaves=True)
    (y.float().sum() + final.sum()).backward()
    for k in got:
        ref = views[k](bases[k].grad).float()
        torch.testing.assert_close(got[k].float(), ref, rtol=0, atol=1e-2 * ref.abs().max().item(), msg=f"d{k}")


# Forward v7 (csrc/sscan/sscan_fwd7.cuh, APRIEL_SSCAN_FWD=v7; session 25): the mixer scan's v7 scan core (tf32 input
# product and readout, one warp per 16 channels) on v2's staging, 16-bit activations, 64-channel blocks inside one
# B / C group. Channel-major, token-major and NaN-padded (plain-load) layouts, grouped u, several B / C groups, no z.
V7_CASES = [
    (1, 1, 64, None, 1, 1, 16, "tm", "init"),
    (2, 77, 128, None, 1, 1, 16, "cm", "init"),
    (3, 100, 256, 64, 1, 2, 16, "tm", ""),
    (1, 63, 256, None, 2, 4, 16, "nan", "noz"),
    (2, 1000, 64, None, 1, 1, 16, "cm", "init"),
    (1, 264, 128, 64, 1, 1, 16, "cm", "noz"),
    (2, 4097, 128, None, 1, 1, 16, "cm", "init"),
]


@gpu
@needs_kernel
@pytest.mark.parametrize("softplus", ["fast", "precise"])
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("case", V7_CASES, ids=CASE_ID)
def test_cuda_forward_v7_parity(case, dtype, softplus, monkeypatch):
    """v7 vs float64 (y, final state), close to v2's outputs, bitwise repeatable; the profiler shows v7 ran. Both
    preps: the MUFU forms (the default, compiled alone) and APRIEL_SSCAN_SOFTPLUS=precise."""
    b, L, d, du, gb, gc, n, layout, extras = case
    args, seq = make_cuda_case(b, L, d, du, gb, gc, n, dtype, extras)
    if "noz" in extras:
        args["z"] = None
    if softplus == "precise":
        monkeypatch.setenv("APRIEL_SSCAN_SOFTPLUS", "precise")
    monkeypatch.setenv("APRIEL_SSCAN_FWD", "v7")
    poison_allocator()
    (y, final, _, _), names = cuda_kernels(lambda: _run(args, seq, layout))
    assert any("sscan_fwd7_kernel" in k for k in names), names
    _, (y64, f64) = _ref(args, seq, True)
    _, (ylp, flp) = _ref(args, seq, False)
    assert y.dtype == dtype and y.is_contiguous()
    check("y", y, y64, ylp, floor=_tol(dtype))
    check("final_state", final, f64, flp, floor=_tol(dtype))
    again, final_again, _, _ = _run(args, seq, layout)
    assert torch.equal(y, again) and torch.equal(final, final_again), "v7 is not bitwise repeatable"
    monkeypatch.setenv("APRIEL_SSCAN_FWD", "v2k4")
    y2, final2, _, _ = _run(args, seq, layout)
    torch.testing.assert_close(final, final2, rtol=0, atol=2e-3 * final2.abs().max().item())
    torch.testing.assert_close(y.float(), y2.float(), rtol=0, atol=2e-2 * y2.abs().max().item())


# The forward v7's sequence split (session 27, APRIEL_SSCAN_FWD_SEGMENTS): the state pre-pass
# (sscan_fwd7_state_kernel) for every segment but the last, each segment's blocks from the folded state, the final
# state from the last segment, the checkpoints (which the backward then consumes) from every segment. Ragged last
# segments and tiles, pre-pass groups without tiles, more segments asked than tiles (capped), both fast stagings.
V7_FWD_SPLIT_CASES = [
    ((1, 4096, 64, None, 1, 1, 16, "cm", "init"), 8),  # 128 tiles: 16 per segment, 4 per pre-pass group
    ((2, 1000, 128, None, 1, 2, 16, "tm", "init"), 3),  # 32 tiles: 11 + 11 + 10
    ((1, 2049, 128, 64, 1, 1, 16, "tm", "noz"), 5),  # 65 tiles: 13 per segment, the last tile 1 token
    ((1, 77, 64, None, 1, 1, 16, "tm", ""), 2),  # 3 tiles: 2 + 1 (pre-pass groups of 1 tile and none)
    ((3, 264, 256, None, 2, 1, 16, "tm", "init"), 20),  # 9 tiles: capped at 9 segments of 1 tile
]


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("case,segments", V7_FWD_SPLIT_CASES,
                         ids=lambda v: CASE_ID(v) if isinstance(v, tuple) else f"S{v}")
def test_cuda_forward_v7_split(case, segments, dtype, monkeypatch):
    """The split forward v7 vs float64 (y, final state), bitwise repeatable, close to the unsplit v7; the profiler
    shows the state pre-pass ran; its checkpoints give float64-close gradients (backward v7)."""
    b, L, d, du, gb, gc, n, layout, extras = case
    args, seq = make_cuda_case(b, L, d, du, gb, gc, n, dtype, extras)
    if "noz" in extras:
        args["z"] = None
    monkeypatch.setenv("APRIEL_SSCAN_FWD", "v7")
    monkeypatch.setenv("APRIEL_SSCAN_FWD_SEGMENTS", str(segments))
    poison_allocator()
    (y, final, _, _), names = cuda_kernels(lambda: _run(args, seq, layout))
    assert any("sscan_fwd7_state_kernel" in k for k in names), names
    assert any("sscan_fwd7_kernel" in k for k in names), names
    _, (y64, f64) = _ref(args, seq, True)
    _, (ylp, flp) = _ref(args, seq, False)
    check("y", y, y64, ylp, floor=_tol(dtype))
    check("final_state", final, f64, flp, floor=_tol(dtype))
    again, final_again, _, _ = _run(args, seq, layout)
    assert torch.equal(y, again) and torch.equal(final, final_again), "the split v7 is not bitwise repeatable"
    monkeypatch.setenv("APRIEL_SSCAN_FWD_SEGMENTS", "1")
    (y1, final1, _, _), names = cuda_kernels(lambda: _run(args, seq, layout))
    assert not any("sscan_fwd7_state_kernel" in k for k in names), names
    torch.testing.assert_close(final, final1, rtol=0, atol=2e-3 * final1.abs().max().item())
    torch.testing.assert_close(y.float(), y1.float(), rtol=0, atol=2e-2 * y1.abs().max().item())
    monkeypatch.setenv("APRIEL_SSCAN_FWD_SEGMENTS", str(segments))
    monkeypatch.setenv("APRIEL_SSCAN_BWD", "v7")
    _gradient_parity(case, dtype)  # (the forward saves the split's checkpoints; the backward consumes them)


@gpu
@needs_kernel
@pytest.mark.parametrize("extras", ["packed_init", "fp32", "d48"])
def test_cuda_forward_v7_falls_back_to_v2(extras, monkeypatch):
    """Where v7 does not apply (documents, fp32, d_inner not a multiple of 64), APRIEL_SSCAN_FWD=v7 runs v2."""
    dtype = torch.float32 if extras == "fp32" else torch.bfloat16
    args, seq = make_cuda_case(2, 70, 48 if extras == "d48" else 64, None, 1, 1, 16, dtype, extras)
    monkeypatch.setenv("APRIEL_SSCAN_FWD", "v7")
    (y, final, _, _), names = cuda_kernels(lambda: _run(args, seq, "cm"))
    assert not any("sscan_fwd7_kernel" in k for k in names), names
    assert any("sscan_fwd2_kernel" in k for k in names), names
    _, (y64, f64) = _ref(args, seq, True)
    _, (ylp, flp) = _ref(args, seq, False)
    check("y", y, y64, ylp, floor=_tol(dtype))


@gpu
@needs_kernel
def test_cuda_gradient_through_forward_v7(monkeypatch):
    """The backward v2 takes v7's state checkpoints (the same layout): gradients as with v2's, within tf32's error."""
    args, seq = make_cuda_case(2, 264, 128, None, 1, 1, 16, torch.bfloat16, "init")
    grads = {}
    for variant in ("v7", "v2k4"):
        monkeypatch.setenv("APRIEL_SSCAN_FWD", variant)
        y, final, bases, views = _run(args, seq, "cm", leaves=True)
        (y.float().sum() + final.sum()).backward()
        grads[variant] = {k: views[k](bases[k].grad).float() for k in bases}
    for k, ref in grads["v2k4"].items():
        got = grads["v7"][k]
        assert torch.isfinite(got).all(), f"d{k}"
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-2 * ref.abs().max().item(), msg=f"d{k}")


# Backward v2 (csrc/sscan/sscan_bwd2.cuh, APRIEL_SSCAN_BWD=v2: the forward v2's shapes) on every staging path.
V2_GRAD_CASES = [
    (1, 1, 64, None, 1, 4, 16, "tm", "init"),
    (2, 77, 64, None, 1, 1, 16, "tm", "packed_init"),
    (2, 63, 64, 16, 2, 4, 16, "cm", "init"),
    (3, 65, 64, None, 1, 1, 16, "nan", "packed_init"),
    (1, 2049, 64, None, 1, 1, 16, "cm", ""),
    (2, 264, 64, None, 1, 1, 16, "cm", "packed_init"),
    (1, 1000, 128, 32, 2, 2, 16, "cm", "init"),
]


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", V2_GRAD_CASES, ids=CASE_ID)
def test_cuda_backward_v2_parity(case, dtype, monkeypatch):
    monkeypatch.setenv("APRIEL_SSCAN_BWD", "v2")
    _gradient_parity(case, dtype)


@gpu
@needs_kernel
def test_cuda_backward_v2_deterministic_and_close_to_v1(monkeypatch):
    args, seq = make_cuda_case(2, 200, 128, None, 1, 8, 16, torch.float32, "packed_init")

    def grads():
        leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
        y, f = selective_scan(**leaves, delta_softplus=True, seq_idx=seq, return_final_state=True)
        (y.sum() + f.sum()).backward()
        return {k: leaves[k].grad for k in leaves}

    v1 = grads()
    monkeypatch.setenv("APRIEL_SSCAN_BWD", "v2")
    first, second = grads(), grads()
    for k in v1:
        assert torch.equal(first[k], second[k]), f"d{k}: backward v2 not deterministic"
        torch.testing.assert_close(first[k], v1[k], rtol=1e-4, atol=1e-4 * v1[k].abs().max().item(), msg=f"d{k}")


# Backward v7 (csrc/sscan/sscan_bwd7.cuh, APRIEL_SSCAN_BWD=v7: the mixer scan's v7 backward core) on the forward v7's
# shapes with its fast stagings: channel-major (mamba's) and token-major, 16-bit, grouped u (du summed on the host),
# several B / C groups, no z, ragged last tiles, long sequences.
# (Channel-major rows take 16-byte copies only where L % 8 == 0: odd L runs token-major here.)
V7_GRAD_CASES = [
    (1, 1, 64, None, 1, 1, 16, "tm", "init"),
    (2, 77, 128, None, 1, 1, 16, "tm", "init"),
    (3, 100, 256, 64, 1, 2, 16, "tm", ""),
    (1, 264, 128, None, 2, 1, 16, "cm", "noz"),
    (2, 1000, 64, None, 1, 1, 16, "cm", "init"),
    (1, 2049, 128, None, 1, 1, 16, "tm", "noz"),
    (2, 4097, 64, 16, 1, 1, 16, "tm", "init"),
    (2, 4104, 128, 16, 1, 1, 16, "cm", "init"),
]


@gpu
@needs_kernel
@pytest.mark.parametrize("softplus", ["fast", "precise"])
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("case", V7_GRAD_CASES, ids=CASE_ID)
def test_cuda_backward_v7_parity(case, dtype, softplus, monkeypatch):
    """v7's gradients vs float64, bitwise repeatable, close to v2's; the profiler shows v7 ran. Both preps."""
    if softplus == "precise":
        monkeypatch.setenv("APRIEL_SSCAN_SOFTPLUS", "precise")
    monkeypatch.setenv("APRIEL_SSCAN_BWD", "v7")
    got, names = cuda_kernels(lambda: _gradient_parity(case, dtype))
    assert any("sscan_bwd7_kernel" in k for k in names), names
    assert not any("sscan_bwd2_kernel" in k for k in names), names
    again = _gradient_parity(case, dtype)
    for k in got:
        assert torch.equal(got[k], again[k]), f"d{k}: backward v7 is not bitwise repeatable"
    monkeypatch.setenv("APRIEL_SSCAN_BWD", "v2")
    v2 = _gradient_parity(case, dtype)
    for k, ref in v2.items():
        torch.testing.assert_close(got[k].float(), ref.float(), rtol=0, atol=1e-2 * ref.abs().max().item(),
                                   msg=f"d{k}")


# The backward v7's sequence split (session 27, APRIEL_SSCAN_BWD_SEGMENTS): segments of ceil(tiles / S) tiles, the
# carry pre-pass (sscan_bwd7_carry_kernel) for every segment but the first, per-segment partial rows. Segment counts
# that leave a ragged last segment, a carry group without tiles (fewer tiles than the pre-pass's 4 groups), more
# segments asked than tiles (capped), the final state's gradient carried across segments, the initial state's from
# segment 0, channel-major and token-major, grouped u, 2 C groups, no z.
V7_SPLIT_CASES = [
    ((1, 4097, 64, None, 1, 1, 16, "tm", "init"), 3),  # 129 tiles: 43 + 43 + 43, the last tile 1 token
    ((2, 1000, 128, None, 1, 1, 16, "cm", "init"), 4),  # 32 tiles: 8 per segment, 2 per carry group
    ((1, 2048, 128, 64, 1, 2, 16, "cm", "noz"), 8),  # 64 tiles: 8 per segment
    ((1, 77, 64, None, 1, 1, 16, "tm", "init"), 2),  # 3 tiles: 2 + 1 (carry groups of 1 tile and none)
    ((3, 264, 256, None, 2, 1, 16, "tm", "init"), 20),  # 9 tiles: capped at 9 segments of 1 tile
]


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("case,segments", V7_SPLIT_CASES, ids=lambda v: CASE_ID(v) if isinstance(v, tuple) else f"S{v}")
def test_cuda_backward_v7_split(case, segments, dtype, monkeypatch):
    """v7 with the sequence split: gradients vs float64, bitwise repeatable, close to the unsplit v7's; the profiler
    shows the carry pre-pass ran (and does not without the split)."""
    monkeypatch.setenv("APRIEL_SSCAN_BWD", "v7")
    monkeypatch.setenv("APRIEL_SSCAN_BWD_SEGMENTS", str(segments))
    got, names = cuda_kernels(lambda: _gradient_parity(case, dtype))
    assert any("sscan_bwd7_carry_kernel" in k for k in names), names
    assert any("sscan_bwd7_kernel" in k for k in names), names
    again = _gradient_parity(case, dtype)
    for k in got:
        assert torch.equal(got[k], again[k]), f"d{k}: the split backward v7 is not bitwise repeatable"
    monkeypatch.setenv("APRIEL_SSCAN_BWD_SEGMENTS", "1")
    whole, names = cuda_kernels(lambda: _gradient_parity(case, dtype))
    assert not any("sscan_bwd7_carry_kernel" in k for k in names), names
    for k, ref in whole.items():
        torch.testing.assert_close(got[k].float(), ref.float(), rtol=0, atol=1e-2 * ref.abs().max().item(),
                                   msg=f"d{k}")


@gpu
@needs_kernel
@pytest.mark.parametrize("value", ["0", "-2", "four"])
@pytest.mark.parametrize("knob", ["FWD", "BWD"])
def test_cuda_v7_segments_env_rejected(knob, value, monkeypatch):
    """APRIEL_SSCAN_FWD_SEGMENTS / APRIEL_SSCAN_BWD_SEGMENTS must be positive integers: a ValueError naming the knob
    (raised in Python: the C++ check's exception would kill the GPU machine's process), not a silent default - from
    the forward, and from the backward (which may rerun the forward)."""
    name = f"APRIEL_SSCAN_{knob}_SEGMENTS"
    args, _ = make_cuda_case(1, 64, 64, None, 1, 1, 16, torch.bfloat16, "")
    leaves = {k: v.clone().requires_grad_(True) if v is not None else None for k, v in args.items()}
    y = selective_scan(**leaves, delta_softplus=True)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        y.float().sum().backward()
    with pytest.raises(ValueError, match=name):
        selective_scan(**leaves, delta_softplus=True)


@gpu
@needs_kernel
@pytest.mark.parametrize("extras", ["packed_init", "fp32", "d48", "nan"])
def test_cuda_backward_v7_falls_back_to_v2(extras, monkeypatch):
    """Where v7 does not apply (documents, fp32, d_inner not a multiple of 64, no fast staging), APRIEL_SSCAN_BWD=v7
    runs v2 - with correct gradients."""
    dtype = torch.float32 if extras == "fp32" else torch.bfloat16
    case = (2, 70, 48 if extras == "d48" else 64, None, 1, 1, 16, "nan" if extras == "nan" else "cm", extras)
    monkeypatch.setenv("APRIEL_SSCAN_BWD", "v7")
    _, names = cuda_kernels(lambda: _gradient_parity(case, dtype))
    assert not any("sscan_bwd7_kernel" in k for k in names), names
    assert any("sscan_bwd2_kernel" in k for k in names), names


@gpu
@needs_kernel
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_cuda_v7_default_dispatch(direction, monkeypatch):
    """Without APRIEL_SSCAN_FWD / APRIEL_SSCAN_BWD: the forward / backward v7 for channel-major (mamba) and token-major
    inputs with aligned rows once its grid (batch x d_inner / 64 blocks x its sequence split's segments) reaches 0.9
    blocks per SM; v2 below that and for rows without 16-byte copies. L 64 = 2 tiles: at most 2 segments."""
    monkeypatch.delenv("APRIEL_SSCAN_FWD" if direction == "fwd" else "APRIEL_SSCAN_BWD", raising=False)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    d = 1024
    big = -(-9 * sms // (10 * (d // 64)))  # smallest batch whose v7 grid reaches 0.9 blocks per SM

    def kernels(batch, layout):
        args, seq = make_cuda_case(batch, 64, d, None, 1, 1, 16, torch.bfloat16, "")

        def call():
            y, final, _, _ = _run(args, seq, layout, leaves=direction == "bwd")
            if direction == "bwd":
                (y.float().sum() + final.sum()).backward()

        return cuda_kernels(call)[1]

    v7, v2 = f"sscan_{direction}7_kernel", f"sscan_{direction}2_kernel"
    pre = "sscan_fwd7_state_kernel" if direction == "fwd" else "sscan_bwd7_carry_kernel"
    for layout in ("cm", "tm"):
        assert any(v7 in k for k in kernels(big, layout)), layout
    for batch, layout in ((1, "cm"), (big, "nan")):  # (b1: 2 segments of 16 blocks do not fill the grid)
        names = kernels(batch, layout)
        assert not any(v7 in k for k in names), (batch, layout, names)
        assert any(v2 in k for k in names), (batch, layout, names)
    names = kernels(big - 1, "cm")  # one batch below: the sequence split (2 segments) fills it
    assert any(v7 in k for k in names) and any(pre in k for k in names), names


@gpu
@needs_kernel
def test_cuda_backward_v7_padded_rows_fall_back_to_v2(monkeypatch):
    """Channel-major activations in rows padded to 80 tokens (L 77: the forward v7's fast staging applies) with a dy
    of plain 77-token rows (no 16-byte copies): APRIEL_SSCAN_BWD=v7 runs v2, whose whole-sequence partials are one row
    per sequence - not the split's rows per (sequence, segment), which batch 1 would have had. Gradients vs float64."""
    b, L, d, pad = 1, 77, 64, 80
    args, _ = make_cuda_case(b, L, d, None, 1, 1, 16, torch.bfloat16, "")

    def padded(t):  # (b, L, C...) token-major -> a (b, C, L) / (b, G, N, L) view into rows of `pad` tokens
        t = t.movedim(1, -1)
        base = torch.zeros(*t.shape[:-1], pad, dtype=t.dtype, device=t.device)
        base[..., :L] = t
        return base[..., :L]

    leaves = {"u": padded(args["u"]), "delta": padded(args["delta"]), "A": args["A"].clone(),
              "B": padded(args["B"]), "C": padded(args["C"]), "D": args["D"].clone(), "z": padded(args["z"]),
              "delta_bias": args["delta_bias"].clone()}
    leaves = {k: v.requires_grad_(True) for k, v in leaves.items()}
    dy = torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("APRIEL_SSCAN_BWD", "v7")

    def run():
        selective_scan_fn(*leaves.values(), delta_softplus=True).backward(dy)

    _, names = cuda_kernels(run)
    assert any("sscan_bwd2_kernel" in k for k in names), names
    assert not any("sscan_bwd7" in k for k in names), names
    ref = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    t = lambda x: x.movedim(-1, 1)  # noqa: E731  (b, C, L) -> (b, L, C); (b, G, N, L) -> (b, L, G, N)
    y64 = selective_scan_ref(t(ref["u"]), t(ref["delta"]), ref["A"], t(ref["B"]), t(ref["C"]), ref["D"], t(ref["z"]),
                             ref["delta_bias"], delta_softplus=True)
    y64.backward(t(dy.double()))
    for k, v in leaves.items():
        scale = ref[k].grad.abs().max().item()
        assert torch.isfinite(v.grad).all(), f"d{k}"
        assert err(v.grad, ref[k].grad) <= 2e-2 * scale, f"d{k}: err {err(v.grad, ref[k].grad):.3e} vs {scale:.3e}"


@gpu
@needs_kernel
@pytest.mark.parametrize("dy_layout", ["cm", "tm", "cm_offset"])
def test_cuda_backward_v7_mamba_layout_dy(dy_layout, monkeypatch):
    """selective_scan_fn (mamba's channel-major layout) backward with dy channel-major (v7 reads it in place),
    token-major, or channel-major at a 2-byte offset (not 16-byte aligned: v7 copies it): gradients vs float64 and
    equal to v2's within tf32's error."""
    b, L, d = 2, 264, 128
    args, _ = make_cuda_case(b, L, d, None, 1, 1, 16, torch.bfloat16, "init")
    gen = torch.Generator(device="cuda").manual_seed(3)
    w = torch.randn(b, d, L, device="cuda", generator=gen, dtype=torch.float64)
    if dy_layout == "cm":
        dy = w.to(torch.bfloat16)
    elif dy_layout == "tm":
        dy = w.to(torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
    else:
        dy = torch.empty(b * d * L + 1, device="cuda", dtype=torch.bfloat16)[1:].view(b, d, L).copy_(w)
    cm = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731

    def grads(variant, f64=False):
        """Gradients of (y * dy).sum() to the channel-major leaves: the CUDA op (APRIEL_SSCAN_BWD=variant) or the
        float64 reference on the same values."""
        bc = lambda t: t[:, :, 0].transpose(1, 2).contiguous()  # noqa: E731  (b, L, 1, N) -> (b, N, L)
        leaves = {"u": cm(args["u"]), "delta": cm(args["delta"]), "A": args["A"], "B": bc(args["B"]),
                  "C": bc(args["C"]), "D": args["D"], "z": cm(args["z"]), "delta_bias": args["delta_bias"]}
        leaves = {k: (v.double() if f64 else v).clone().requires_grad_(True) for k, v in leaves.items()}
        lv = leaves
        if f64:
            t = lambda x: x.transpose(1, 2)  # noqa: E731
            y = t(selective_scan_ref(t(lv["u"]), t(lv["delta"]), lv["A"], t(lv["B"])[:, :, None],
                                     t(lv["C"])[:, :, None], lv["D"], t(lv["z"]), lv["delta_bias"],
                                     delta_softplus=True))
        else:
            monkeypatch.setenv("APRIEL_SSCAN_BWD", variant)
            y = selective_scan_fn(*lv.values(), delta_softplus=True)
        y.backward(dy.to(y.dtype))
        return {k: v.grad for k, v in leaves.items()}

    v7, names = cuda_kernels(lambda: grads("v7"))
    assert any("sscan_bwd7_kernel" in k for k in names), names
    v2 = grads("v2")
    ref = grads(None, f64=True)
    for k in v7:
        scale = ref[k].abs().max().item()
        assert torch.isfinite(v7[k]).all(), f"d{k}"
        assert err(v7[k], ref[k]) <= 2e-2 * scale, f"d{k}: err {err(v7[k], ref[k]):.3e} vs max {scale:.3e}"
        torch.testing.assert_close(v7[k].float(), v2[k].float(), rtol=0, atol=1e-2 * v2[k].abs().max().item(),
                                   msg=f"d{k}")
