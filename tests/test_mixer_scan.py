"""apriel::mixer_scan_fwd / _bwd: the fused mixer core (in_proj output -> y), CPU reference and CUDA kernel.

CPU tests (fast): the public op against a naive float64 token loop, gradcheck, split / packed sequences,
opcheck, torch.compile(fullgraph=True), argument errors. GPU tests (@gpu): the CUDA kernel against the
float64 reference for y, final states and every gradient, with the tolerance set by PyTorch's own
low-precision error (|kernel - ref64| <= 2 |torch_lowprec - ref64| + floor).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from apriel_kernels import mixer_scan, mixer_step
from apriel_kernels.mixer_scan import VARLEN_MAX_DOCUMENTS, mixer_scan_bwd, mixer_scan_fwd, varlen_plan
from apriel_kernels.reference.mixer import mixer_scan_ref
from conftest import require_cuda_kernel

N = 16


# ------------------------------------------------------------------------------------------------ inputs
def make_inputs(batch, seqlen, d_inner, d_xb, *, dtype=torch.float32, device="cpu", repeat=True, dt_rank=8, width=4,
                initial_states=False, conv_state_channels=None, strided=False, seed=0):
    """Fresh random mixer inputs (never zeros), realistic scales (dt ~ 1e-3..0.1, A_log ~ log(n+1))."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    width_z = 2 * d_inner + 2 * d_xb
    zxbc = rnd(batch, seqlen, width_z)
    conv_ch = d_inner if repeat else d_xb
    dt = torch.exp(torch.rand(d_inner, generator=g, dtype=torch.float64) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inv_softplus = dt + torch.log(-torch.expm1(-dt))
    args = dict(
        zxbc=zxbc,
        dt_low=rnd(batch, seqlen, dt_rank) * 0.5,
        conv_weight=rnd(conv_ch, width) * 0.5,
        conv_bias=rnd(conv_ch) * 0.2,
        dt_proj_weight=rnd(d_inner, dt_rank) * dt_rank ** -0.5,
        dt_proj_bias=inv_softplus / 2,  # applied twice
        A_log=torch.log(torch.arange(1, N + 1, dtype=torch.float64)).repeat(d_inner, 1) + 0.1 * rnd(d_inner, N),
        D=rnd(d_inner),
    )
    kw = dict(d_inner=d_inner, d_xb=d_xb, d_state=N, repeat_kv_before_conv=repeat)
    if initial_states:
        args["initial_ssm_state"] = rnd(batch, d_inner // N, N, N) * 0.5
        args["initial_conv_state"] = rnd(batch, conv_state_channels or d_xb, width + 1)
    out = {}
    for k, v in args.items():
        if k in ("A_log", "D", "initial_ssm_state"):
            v = v.float() if dtype != torch.float64 else v
        else:
            v = v.to(dtype)
        out[k] = v.to(device)
    if strided:  # a view into a wider NaN-filled buffer: reading outside the slice poisons the result
        base = torch.full((batch, seqlen, width_z + 24), float("nan"), dtype=dtype, device=device)
        base[..., 8:8 + width_z] = out["zxbc"]
        out["zxbc"] = base[..., 8:8 + width_z]
    return out, kw


def packed_seq_idx(batch, seqlen, cuts, device="cpu"):
    seq = torch.zeros(batch, seqlen, dtype=torch.int32, device=device)
    for c in cuts:
        seq[:, c:] += 1
    return seq


def ref_mixer(args, kw, **extra):
    """mixer_scan_ref on the op's keyword names (the reference calls the skip D_skip)."""
    a = dict(args)
    a["D_skip"] = a.pop("D")
    return mixer_scan_ref(**a, **kw, **extra)


def to64(args):
    return {k: (v.detach().double() if v.is_floating_point() else v) for k, v in args.items()}


def naive_mixer(args, kw, seq_idx=None):
    """Token-by-token float64 loop written from mixer.md section 3 (independent of the chunked reference)."""
    a = to64(args)
    D_, X, r = kw["d_inner"], kw["d_xb"], kw["d_inner"] // kw["d_xb"]
    z, x, B, C = torch.split(a["zxbc"], [D_, X, X, D_], dim=-1)
    b, L, _ = x.shape
    c = torch.arange(D_)
    src = (c // (N * r)) * N + c % N
    w = a["conv_weight"]
    W = w.shape[1]
    h = a.get("initial_ssm_state", torch.zeros(b, D_ // N, N, N, dtype=torch.float64)).reshape(b, D_, N).clone()
    hist = a["initial_conv_state"][..., -(W - 1):] if "initial_conv_state" in a else torch.zeros(b, X, W - 1, dtype=torch.float64)
    if hist.shape[1] != X:  # D-channel layout: the first copy of each X channel
        hist = hist[:, (torch.arange(X) // N) * N * r + torch.arange(X) % N]
    window = [hist[:, :, k] for k in range(W - 1)]  # X-channel pre-conv inputs, oldest first
    A = -torch.exp(a["A_log"])
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0 and not torch.equal(seq_idx[:, t], seq_idx[:, t - 1]):
            reset = (seq_idx[:, t] != seq_idx[:, t - 1]).double().view(b, 1)
            window = [wv * (1 - reset) for wv in window]
            h = h * (1 - reset).view(b, 1, 1)
        window = window + [x[:, t]]
        taps = torch.stack(window[-W:], dim=-1)  # (b, X, W)
        if kw["repeat_kv_before_conv"]:
            pre = (taps[:, src] * w).sum(-1) + a["conv_bias"]
        else:
            pre = ((taps * w).sum(-1) + a["conv_bias"])[:, src]
        u = F.silu(pre)
        v = a["dt_low"][:, t] @ a["dt_proj_weight"].t() + 2 * a["dt_proj_bias"]
        delta = torch.where(v > 20, v, torch.log1p(torch.exp(v)))
        Bt = B[:, t].reshape(b, X // N, N)[:, c // (N * r)]
        Ct = C[:, t].reshape(b, D_ // N, N)[:, c // N]
        h = torch.exp(delta[..., None] * A) * h + (delta * u)[..., None] * Bt
        y = (h * Ct).sum(-1) + a["D"] * u
        ys.append(y * F.silu(z[:, t]))
    return torch.stack(ys, 1), h.reshape(b, D_ // N, N, N)


# ------------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("repeat", [True, False], ids=["repeat", "no_repeat"])
@pytest.mark.parametrize("packed", [False, True], ids=["single", "packed"])
def test_op_matches_naive_loop(repeat, packed):
    conv_layout = 64 if repeat and packed else None  # the D-channel conv state layout once
    args, kw = make_inputs(2, 21, 64, 16, dtype=torch.float64, repeat=repeat, initial_states=True,
                           conv_state_channels=conv_layout)
    seq = packed_seq_idx(2, 21, [5, 13]) if packed else None
    y, ssm, _ = mixer_scan(**args, **kw, seq_idx=seq, return_final_states=True)
    y_ref, h_ref = naive_mixer(args, kw, seq)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ssm, h_ref, rtol=1e-9, atol=1e-9)


def test_gradcheck_float64():
    args, kw = make_inputs(1, 5, 32, 16, dtype=torch.float64, dt_rank=2, width=3, initial_states=True)
    names = list(args)
    leaves = [args[k].clone().requires_grad_(True) for k in names]

    def f(*ts):
        y, ssm, conv = mixer_scan(**dict(zip(names, ts)), **kw, return_final_states=True)
        return y, ssm, conv

    # fast mode: one random direction per input (the full Jacobian takes minutes on the reference)
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("repeat", [True, False], ids=["repeat", "no_repeat"])
def test_split_sequence_continuity_cpu(repeat):
    args, kw = make_inputs(2, 40, 64, 16, repeat=repeat, initial_states=True)
    y, ssm, conv = mixer_scan(**args, **kw, return_final_states=True)
    first = {k: (v[:, :17] if k in ("zxbc", "dt_low") else v) for k, v in args.items()}
    second = {k: (v[:, 17:] if k in ("zxbc", "dt_low") else v) for k, v in args.items() if "initial" not in k}
    ya, sa, ca = mixer_scan(**first, **kw, return_final_states=True)
    yb, sb, cb = mixer_scan(**second, **kw, initial_ssm_state=sa, initial_conv_state=ca, return_final_states=True)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sb, ssm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cb, conv)


@pytest.mark.parametrize("value,want", [("", 1), ("tile", 1), ("sub", 1), ("sub-always", 2), ("auto", None),
                                        ("SUB", None)])
def test_checkpoint_mode_knob(value, want, monkeypatch):
    """APRIEL_SCAN_CKPT: tile (the default), sub (fp32 activations keep tile checkpoints), sub-always - anything else
    is a ValueError naming the variable."""
    from apriel_kernels.mixer_scan import _checkpoint_mode
    monkeypatch.setenv("APRIEL_SCAN_CKPT", value)
    zxbc, dt_low = torch.empty(8, 4, 10240), torch.empty(8, 4, 16)
    if want is None:
        with pytest.raises(ValueError, match="APRIEL_SCAN_CKPT"):
            _checkpoint_mode(zxbc, dt_low, None, 4096, 1024, True)
    else:
        assert _checkpoint_mode(zxbc, dt_low, None, 4096, 1024, True) == want
        assert _checkpoint_mode(zxbc, dt_low, None, 4096, 1024, False) == 0


def test_opcheck_cpu():
    args, kw = make_inputs(2, 9, 32, 16, dt_rank=4, initial_states=True)
    seq = packed_seq_idx(2, 9, [4])
    pos = [args["zxbc"], args["dt_low"], args["conv_weight"], args["conv_bias"], args["dt_proj_weight"],
           args["dt_proj_bias"], args["A_log"], args["D"], args["initial_ssm_state"], args["initial_conv_state"], seq,
           kw["d_inner"], kw["d_xb"], kw["d_state"], True, True]
    torch.library.opcheck(mixer_scan_fwd, pos)
    y = mixer_scan_fwd(*pos)[0]
    dy = torch.randn_like(y)
    dfinal_ssm = torch.randn_like(args["initial_ssm_state"])
    torch.library.opcheck(mixer_scan_bwd, pos[:15] + [dy, dfinal_ssm, None, None])


def test_compile_fullgraph_cpu():
    args, kw = make_inputs(1, 12, 32, 16, dt_rank=4)
    f = torch.compile(lambda a: mixer_scan(**a, **kw), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(args), mixer_scan(**args, **kw))


@pytest.mark.parametrize("used", ["final_states", "y"])
def test_backward_with_unused_outputs_cpu(used, monkeypatch):
    """Unused outputs reach the backward as None (ctx.set_materialize_grads(False): no zero-filled cotangents, the
    checkpoints' would be their size): the op sees None for them; eager and compiled (aot_eager) gradients agree, for
    a loss on the final states alone (dy None -> zeros) or on y alone."""
    import sys

    scan_module = sys.modules["apriel_kernels.mixer_scan"]
    seen = []

    def spy(*a):
        seen.append(tuple(x is None for x in a[16:18]))  # dfinal_ssm_state, dfinal_conv_state
        return real_bwd(*a)

    real_bwd = scan_module.mixer_scan_bwd
    monkeypatch.setattr(scan_module, "mixer_scan_bwd", spy)
    args, kw = make_inputs(1, 12, 32, 16, dt_rank=4, initial_states=True)

    def grads(fn):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}
        y, ssm, conv = fn(leaves)
        loss = (ssm.square().sum() + conv.sum()) if used == "final_states" else y.sum()
        loss.backward()
        return {k: v.grad for k, v in leaves.items()}

    run = lambda a: mixer_scan(**a, **kw, return_final_states=True)  # noqa: E731
    eager = grads(run)
    assert seen == [(False, False)] if used == "final_states" else seen == [(True, True)], seen
    compiled = grads(torch.compile(run, fullgraph=True, backend="aot_eager"))
    for name, g in eager.items():
        assert g is not None and torch.isfinite(g).all(), name
        torch.testing.assert_close(compiled[name], g, rtol=1e-5, atol=1e-6)
    assert eager["zxbc"].abs().sum() > 0


def test_errors_name_the_argument():
    args, kw = make_inputs(1, 4, 32, 16, dt_rank=4)
    with pytest.raises(ValueError, match="zxbc"):
        mixer_scan(**{**args, "zxbc": args["zxbc"][..., :-1]}, **kw)
    with pytest.raises(TypeError, match="dt_low"):
        mixer_scan(**{**args, "dt_low": args["dt_low"].double()}, **kw)
    with pytest.raises(ValueError, match="A_log"):
        mixer_scan(**{**args, "A_log": args["A_log"][:, :8]}, **kw)
    with pytest.raises(ValueError, match="d_inner"):
        mixer_scan(**args, d_inner=40, d_xb=16, d_state=N)
    with pytest.raises(ValueError, match="initial_conv_state"):
        mixer_scan(**args, **kw, initial_conv_state=torch.randn(1, 7, 3))


# ------------------------------------------------------------------------------------------------ GPU
gpu = pytest.mark.gpu
needs_kernel = require_cuda_kernel("mixer_scan_fwd")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DT_IDS = ["bf16", "fp16", "fp32"]


def poison_allocator(nbytes=256 << 20):
    """Fill the caching allocator's free blocks with NaN so an output the kernel forgets to write is NaN."""
    t = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del t


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check(name, out, ref64, ref_lp, k=2.0, floor=1e-5):
    """|out - ref64| <= k |ref_lp - ref64| + floor * max|ref64|  (PyTorch's own low-precision error as scale)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    scale = ref64.abs().max().item() + 1e-30
    e, e_lp = err(out, ref64), err(ref_lp, ref64)
    assert e <= k * e_lp + floor * scale, f"{name}: err {e:.3e} > {k} x torch low-prec err {e_lp:.3e} + {floor:.0e} x {scale:.3e}"


FWD_CASES = [
    # (batch, seqlen, d_inner, d_xb, repeat, extras)
    (1, 1, 64, 16, True, ""),
    (3, 2, 64, 16, False, "init"),
    (1, 3, 256, 64, True, "init_D"),
    (2, 63, 256, 64, True, "strided"),
    (3, 65, 64, 16, False, "packed"),
    (1, 2049, 256, 64, True, "init"),
    (8, 4097, 64, 16, True, "packed"),
    (1, 32768, 64, 16, True, ""),
    (2, 300, 4096, 1024, True, "init"),
]


def _case_inputs(case, dtype):
    b, L, D_, X, repeat, extra = case
    args, kw = make_inputs(b, L, D_, X, dtype=dtype, device="cuda", repeat=repeat, dt_rank=16 if D_ > 256 else 8,
                           initial_states="init" in extra, conv_state_channels=D_ if extra == "init_D" else None,
                           strided=extra == "strided")
    seq = packed_seq_idx(b, L, [L // 3, L // 3 + 1, (2 * L) // 3], "cuda") if extra == "packed" else None
    return args, kw, seq


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: f"b{c[0]}-L{c[1]}-D{c[2]}-X{c[3]}-{'rep' if c[4] else 'norep'}-{c[5] or 'plain'}")
def test_forward_parity(case, dtype):
    args, kw, seq = _case_inputs(case, dtype)
    poison_allocator()
    y, ssm, conv = mixer_scan(**args, **kw, seq_idx=seq, return_final_states=True)
    ref64 = ref_mixer(to64(args), kw, seq_idx=seq, return_final_states=True)
    ref_lp = ref_mixer(args, kw, seq_idx=seq, return_final_states=True)
    for name, o, r64, rlp in zip(("y", "final_ssm", "final_conv"), (y, ssm, conv), ref64, ref_lp):
        check(name, o, r64, rlp, floor=2e-5 if dtype == torch.float32 else 1e-3)
    assert conv.dtype == dtype and ssm.dtype == torch.float32 and y.dtype == dtype


# Forward versions (APRIEL_SCAN_FWD: v4 with K = 4 / 8 lanes per channel, v3) and the less common shapes
# of the v4 kernel: conv widths 2 / 3, dt_rank
# 12 (rows not 16-byte copyable: plain-load staging), 24 and 32 (the 32-wide dt staging), packed + initial
# states, a ragged tail tile.
VARIANT_CASES = [
    # (version, batch, seqlen, d_inner, d_xb, width, dt_rank, extras)
    ("v4k4", 2, 77, 64, 16, 2, 8, "init"),
    ("v4k4", 1, 45, 256, 64, 3, 12, "packed"),
    ("v4k4", 3, 100, 64, 16, 4, 24, "strided"),
    ("v4k4", 2, 64, 128, 32, 4, 32, "init_packed"),
    ("v4k4", 2, 1000, 256, 64, 4, 16, "init_packed"),
    ("v4k4", 3, 100, 64, 16, 4, 16, "init_packed"),
    ("v4k8", 1, 50, 256, 64, 2, 32, "strided"),
    ("v4k4", 2, 70, 64, 16, 3, 12, "misaligned"),
    ("v4k8", 2, 131, 256, 64, 4, 16, "init_packed"),
    ("v4k8", 1, 40, 64, 16, 3, 32, "strided"),
    ("v4k8", 2, 70, 64, 16, 4, 16, "misaligned"),
    ("v4k4", 1, 33, 64, 16, 4, 16, "misaligned"),
    ("v3", 2, 131, 256, 64, 4, 16, "init_packed"),
    ("v4k4-bcf32", 2, 77, 64, 16, 4, 16, "init_packed"),
    ("v4k8-bcf32", 1, 45, 256, 64, 3, 32, "strided"),
    # v5 (session 4: v4 with the Smem5 layout, more blocks per SM, branch-free softplus)
    ("v5k4", 2, 1000, 256, 64, 4, 16, "init_packed"),
    ("v5k8", 2, 131, 256, 64, 4, 16, "init_packed"),
    ("v5", 1, 65, 64, 16, 3, 32, "strided"),
    ("v5k4", 3, 100, 64, 16, 2, 24, "init"),
    ("v5k8", 2, 70, 64, 16, 3, 12, "misaligned"),
    ("v5k4", 1, 33, 64, 16, 4, 8, "misaligned"),
    ("v4", 3, 100, 4096, 1024, 4, 16, "init_packed"),  # the session-3 default (K = 4 here: 768 blocks)
    ("v5", 3, 100, 4096, 1024, 4, 16, "init_packed"),
]


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", VARIANT_CASES, ids=lambda c: f"{c[0]}-b{c[1]}-L{c[2]}-D{c[3]}-W{c[5]}-R{c[6]}-{c[7] or 'plain'}")
def test_forward_versions_and_shapes(case, dtype, monkeypatch):
    version, b, L, D_, X, width, rank, extra = case
    monkeypatch.setenv("APRIEL_SCAN_FWD", version.split("-")[0])
    if version.endswith("bcf32"):
        monkeypatch.setenv("APRIEL_SCAN_BC", "f32")
    args, kw = make_inputs(b, L, D_, X, dtype=dtype, device="cuda", dt_rank=rank, width=width,
                           initial_states="init" in extra, strided=extra == "strided", seed=7)
    seq = packed_seq_idx(b, L, [L // 4, L // 2 + 1], "cuda") if "packed" in extra else None
    if extra == "misaligned":  # odd element offsets and strides: no 16-byte copies possible (plain-load staging)
        for name in ("zxbc", "dt_low"):
            t = args[name]
            base = torch.full((b, L, t.shape[-1] + 3), float("nan"), dtype=dtype, device="cuda")
            base[..., 1:1 + t.shape[-1]] = t
            args[name] = base[..., 1:1 + t.shape[-1]]
    poison_allocator()
    y, ssm, conv = mixer_scan(**args, **kw, seq_idx=seq, return_final_states=True)
    ref64 = ref_mixer(to64(args), kw, seq_idx=seq, return_final_states=True)
    ref_lp = ref_mixer(args, kw, seq_idx=seq, return_final_states=True)
    for name, o, r64, rlp in zip(("y", "final_ssm", "final_conv"), (y, ssm, conv), ref64, ref_lp):
        check(name, o, r64, rlp, floor=2e-5 if dtype == torch.float32 else 1e-3)


# v5 changes the shared-memory layout, the residency, the softplus code (select instead of a branch, same
# operations) and loop forms, not the arithmetic: its outputs, final states and checkpoints must equal v4's at the
# same K bit for bit (any difference is a layout or indexing bug). Both K, every dtype, the staging paths (16-byte
# copies, plain loads), dt_rank 8 / 12 / 16 / 32, conv widths, packed documents, initial states, ragged tails,
# the Apriel-H1 width.
V5_BITWISE_CASES = [
    # (K, batch, seqlen, d_inner, d_xb, width, dt_rank, extras)
    (4, 2, 77, 64, 16, 4, 16, "init_packed"),
    (8, 2, 77, 64, 16, 4, 16, "init_packed"),
    (4, 3, 100, 256, 64, 3, 32, "strided"),
    (8, 1, 131, 256, 64, 2, 12, "misaligned"),
    (4, 1, 33, 64, 16, 4, 8, "norep"),
    (8, 3, 65, 256, 64, 4, 24, "norep_init"),
    (4, 8, 1000, 4096, 1024, 4, 16, "packed"),
    (8, 2, 4097, 4096, 1024, 4, 16, ""),
]


def _fwd_op_args(args, kw, seq, save_checkpoints=True):
    """The positional arguments of the forward op (apriel::mixer_scan_fwd) for make_inputs' args / kw."""
    return [args["zxbc"], args["dt_low"], args["conv_weight"], args["conv_bias"], args["dt_proj_weight"],
            args["dt_proj_bias"], args["A_log"], args["D"], args.get("initial_ssm_state"),
            args.get("initial_conv_state"), seq, kw["d_inner"], kw["d_xb"], kw["d_state"], kw["repeat_kv_before_conv"],
            save_checkpoints]


def _fwd_outputs_bitwise_equal(case, dtype, versions, monkeypatch, cuts=None):
    """Runs the forward op (with checkpoints) under each APRIEL_SCAN_FWD version; asserts identical bits.
    cuts: the document starts of packed cases (default L / 4 and L / 2 + 1). Tile checkpoints only: the sub-chunk
    ones are the v7 kernel's alone (other kernels leave them unwritten, flagged 0)."""
    monkeypatch.setenv("APRIEL_SCAN_CKPT", "tile")
    _, b, L, D_, X, width, rank, extra = case
    args, kw = make_inputs(b, L, D_, X, dtype=dtype, device="cuda", dt_rank=rank, width=width, repeat="norep" not in extra,
                           initial_states="init" in extra, strided=extra == "strided", seed=11)
    cuts = [L // 4, L // 2 + 1] if cuts is None else cuts
    seq = packed_seq_idx(b, L, cuts, "cuda") if "packed" in extra else None
    if extra == "misaligned":  # odd element offsets: the plain-load staging path
        for name in ("zxbc", "dt_low"):
            t = args[name]
            base = torch.full((b, L, t.shape[-1] + 3), float("nan"), dtype=dtype, device="cuda")
            base[..., 1:1 + t.shape[-1]] = t
            args[name] = base[..., 1:1 + t.shape[-1]]
    outs = {}
    for version in versions:
        monkeypatch.setenv("APRIEL_SCAN_FWD", version)
        poison_allocator()
        outs[version] = mixer_scan_fwd(*_fwd_op_args(args, kw, seq))
        torch.cuda.synchronize()
    ref_v, new_v = versions
    for name, a, c in zip(("y", "final_ssm", "final_conv", "checkpoints"), outs[ref_v], outs[new_v]):
        assert a.shape == c.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(c.shape)}"
        assert a.numel() > 0 and torch.isfinite(a).all(), f"{name}: {ref_v} output empty or not finite"
        diff = (a.double() - c.double()).abs().max().item()
        assert torch.equal(a, c), f"{name}: {new_v} differs from {ref_v} (max |diff| {diff:.3e})"


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", V5_BITWISE_CASES, ids=lambda c: f"K{c[0]}-b{c[1]}-L{c[2]}-D{c[3]}-W{c[5]}-R{c[6]}-{c[7] or 'plain'}")
def test_forward_v5_bitwise_equals_v4(case, dtype, monkeypatch):
    _fwd_outputs_bitwise_equal(case, dtype, (f"v4k{case[0]}", f"v5k{case[0]}"), monkeypatch)


# v7 (session 5, mixer_scan_fwd7.cuh): the input product du (x) B and the readout C . h on tensor cores (tf32), one
# warp per head, 16-bit activations. Not bitwise v4 / v5 (tf32 rounding of du and of h in the readout): parity
# against float64 with the same tolerance as every forward version, and the profiler proves which kernel ran -
# v7 where it applies (packed documents too, since session 12; any heads per group since session 19), the v5 fallback
# for unaligned rows and fp32.
V7_CASES = [
    # (batch, seqlen, d_inner, d_xb, repeat, width, dt_rank, extras)
    (2, 77, 64, 16, True, 4, 16, "init"),
    (3, 100, 256, 64, False, 3, 16, "strided"),
    (1, 33, 64, 16, True, 2, 8, ""),
    (1, 1, 64, 16, True, 4, 16, "init"),
    (2, 4097, 256, 64, True, 4, 16, "init"),
    (3, 300, 4096, 1024, True, 4, 16, "init"),
    (1, 32768, 64, 16, True, 4, 16, ""),
    (2, 65, 128, 16, True, 4, 16, "init"),  # 8 heads per x / B group: two blocks per group
    # heads per group not a multiple of 4 (session 19): each group's last block has warps without a head
    (2, 77, 48, 16, True, 4, 16, "init"),  # 3 heads per group (SmolLM2, Llama-3.2-3B)
    (3, 100, 192, 64, False, 4, 16, "init"),  # 3 per group, 4 groups
    (2, 300, 112, 16, True, 3, 16, "strided"),  # 7 (Qwen2.5-7B): blocks of 4 + 3 heads
    (1, 129, 80, 16, True, 4, 8, "init"),  # 5 (Qwen2.5-14B): 3 + 2
    (2, 65, 96, 16, False, 4, 16, ""),  # 6 (Qwen2.5-1.5B): 3 + 3
    (2, 97, 32, 16, True, 4, 16, "init"),  # 2
    (2, 97, 64, 64, True, 2, 16, "init"),  # 1 (multi-head attention teachers)
    (2, 300, 3072, 1024, True, 4, 16, "init"),  # Llama-3.2-3B's mixer: 64 groups of 3 heads
    (2, 300, 192, 64, True, 4, 16, "packed"),  # 3 per group with documents
    # packed documents (v7_seq_idx: starts mid-tile, on a tile boundary, one-token documents, past a tile's end)
    (2, 77, 64, 16, False, 3, 16, "packed"),
    (2, 4097, 256, 64, True, 4, 16, "init_packed"),
    (3, 300, 4096, 1024, True, 4, 16, "packed"),
]


def v7_seq_idx(b, L, extra):
    """Documents for the V7_CASES marked packed (None otherwise). Tokens 94 / 95 / 157 are rows 1 / 2 / 0 of the tile
    after theirs (32-token tiles, 3 halo rows): a start at row 1 or 2 cuts that tile's first conv taps (the TMA v5
    kernel then runs its prep with document tests), one at row 0 does not; 193 / 226 are rows 35 / 36 of a tile (the
    v7 backward's transposed conv across the tile edge)."""
    if "packed" not in extra:
        return None
    cuts = sorted({c for c in (1, L // 4, L // 4 + 1, 32, 64, 94, 95, 157, 193, 226, L // 2 + 1, L - 1) if 0 < c < L})
    return packed_seq_idx(b, L, cuts, "cuda")


def _cuda_kernels_run(fn):
    """Names of the CUDA kernels fn launches (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages()]


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("case", V7_CASES, ids=lambda c: f"b{c[0]}-L{c[1]}-D{c[2]}-X{c[3]}-{'rep' if c[4] else 'norep'}-W{c[5]}-R{c[6]}-{c[7] or 'plain'}")
def test_forward_v7_parity(case, dtype, monkeypatch):
    b, L, D_, X, repeat, width, rank, extra = case
    monkeypatch.setenv("APRIEL_SCAN_FWD", "v7")
    args, kw = make_inputs(b, L, D_, X, dtype=dtype, device="cuda", repeat=repeat, dt_rank=rank, width=width,
                           initial_states="init" in extra, strided=extra == "strided", seed=5)
    seq = v7_seq_idx(b, L, extra)
    poison_allocator()
    out = {}
    names = _cuda_kernels_run(lambda: out.update(r=mixer_scan(**args, **kw, seq_idx=seq, return_final_states=True)))
    assert any("mixer_scan_fwd7_kernel" in n for n in names), f"v7 did not run: {names}"
    ref64 = ref_mixer(to64(args), kw, seq_idx=seq, return_final_states=True)
    ref_lp = ref_mixer(args, kw, seq_idx=seq, return_final_states=True)
    for name, o, r64, rlp in zip(("y", "final_ssm", "final_conv"), out["r"], ref64, ref_lp):
        check(name, o, r64, rlp, floor=1e-3)


# The forward versions with a TMA staging variant (csrc/common/tma.cuh) and how the profiler names each: v7, and v5
# K = 8 (the batch 1-2 default; kTma is the fwd4 kernel template's 7th argument, after kVer = 5; v7's 2nd, before
# kSeq).
TMA_FORWARDS = {"v7": ("mixer_scan_fwd7_kernel", ", {}, "), "v5k8": ("mixer_scan_fwd4_kernel", ", 5, {}, false>")}


@gpu
@needs_kernel
@pytest.mark.parametrize("version", list(TMA_FORWARDS))
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("case", V7_CASES, ids=lambda c: f"b{c[0]}-L{c[1]}-D{c[2]}-X{c[3]}-{'rep' if c[4] else 'norep'}-W{c[5]}-R{c[6]}-{c[7] or 'plain'}")
def test_forward_tma_staging_equals_cp_async(case, dtype, version, monkeypatch):
    """The TMA tile staging (CUTLASS / CuTe bulk tensor copies, sm_90: csrc/common/tma.cuh) feeds the same arithmetic
    as the cp.async staging: bitwise the same y and final states - rows past the sequence end (zero fill), strided
    rows inside a NaN-filled buffer, dt_rank 8 (columns past dt_rank), several sequences, initial states - and the
    profiler shows which staging ran (the kernel's kTma template argument). For v5k8 the TMA kernel also runs its own
    pipelined schedule (one barrier per tile, the next tile's prep inside the scan; 3 raw tiles - the L 77 / 100 /
    300 / 4097 / 32768 cases rotate them), so this is that schedule's bitwise check as well."""
    import apriel_kernels

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA staging needs sm_90")
    if not apriel_kernels.build_info().get("tma_staging"):
        pytest.skip("extension built without CUTLASS headers (pip install --no-deps nvidia-cutlass, then rebuild)")
    b, L, D_, X, repeat, width, rank, extra = case
    monkeypatch.setenv("APRIEL_SCAN_FWD", version)
    kernel, suffix = TMA_FORWARDS[version]
    args, kw = make_inputs(b, L, D_, X, dtype=dtype, device="cuda", repeat=repeat, dt_rank=rank, width=width,
                           initial_states="init" in extra, strided=extra == "strided", seed=15)
    seq = v7_seq_idx(b, L, extra)
    results = {}
    for staging in ("0", "1"):
        monkeypatch.setenv("APRIEL_SCAN_TMA", staging)
        poison_allocator()
        out = {}
        names = _cuda_kernels_run(lambda: out.update(r=mixer_scan(**args, **kw, seq_idx=seq, return_final_states=True)))
        want = suffix.format("true" if staging == "1" else "false")
        assert any(kernel in n and want in n for n in names), (staging, names)
        results[staging] = out["r"]
    for name, cp, tm in zip(("y", "final_ssm", "final_conv"), results["0"], results["1"]):
        assert torch.equal(cp, tm), f"{name}: TMA staging differs from cp.async"
        assert torch.isfinite(tm).all(), name


@gpu
@needs_kernel
def test_forward_v7_deterministic_graph_compile_and_default(monkeypatch):
    """v7 is bitwise repeatable, CUDA-graph capturable and torch.compile-able; the default dispatch picks it once its
    grid (4 heads per block) reaches 1.9 blocks per SM (D 4096: batch >= 4 on an H100) and runs v5 below."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    big = -(-19 * sms // (10 * (4096 // 64)))  # smallest batch whose v7 grid reaches 1.9 blocks per SM
    args, kw = make_inputs(big, 100, 4096, 1024, dtype=torch.bfloat16, device="cuda", dt_rank=16, initial_states=True,
                           seed=9)
    assert any("mixer_scan_fwd7_kernel" in n for n in _cuda_kernels_run(lambda: mixer_scan(**args, **kw)))
    for b in (1, big - 1):
        part = {k: (v[:b] if k in ("zxbc", "dt_low", "initial_ssm_state", "initial_conv_state") else v)
                for k, v in args.items()}
        names = _cuda_kernels_run(lambda part=part: mixer_scan(**part, **kw))
        assert not any("mixer_scan_fwd7_kernel" in n for n in names), (b, names)
        # v4 / v5 share the kernel template; 16-bit activations run v5 (kVer, the 6th template argument, = 5) at
        # either lane count since session 8
        assert any("mixer_scan_fwd4_kernel" in n and ", 5, " in n for n in names), (b, names)
    monkeypatch.setenv("APRIEL_SCAN_FWD", "v7")
    first = mixer_scan(**args, **kw, return_final_states=True)
    again = mixer_scan(**args, **kw, return_final_states=True)
    for a, b_ in zip(first, again):
        assert torch.equal(a, b_)
    fresh, _ = make_inputs(big, 100, 4096, 1024, dtype=torch.bfloat16, device="cuda", dt_rank=16, seed=10)
    _assert_compile_and_graph_match_eager(args, kw, fresh["zxbc"])


def _assert_compile_and_graph_match_eager(args, kw, fresh_zxbc):
    """torch.compile(fullgraph=True) gives eager's bits; a captured CUDA graph replayed on new zxbc gives eager's."""
    eager = mixer_scan(**args, **kw)
    compiled = torch.compile(lambda a: mixer_scan(**a, **kw), fullgraph=True)
    torch.testing.assert_close(compiled(args), eager, rtol=0, atol=0)
    static = {k: v.clone() for k, v in args.items()}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mixer_scan(**static, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mixer_scan(**static, **kw)
    static["zxbc"].copy_(fresh_zxbc)
    graph.replay()
    torch.testing.assert_close(out, mixer_scan(**{**args, "zxbc": fresh_zxbc}, **kw), rtol=0, atol=0)


@gpu
@needs_kernel
@pytest.mark.parametrize("batch,d_inner,d_xb,want_v7", [(8, 3072, 1024, True), (8, 2048, 1024, True),
                                                        (4, 5120, 1024, True), (8, 1536, 256, False),
                                                        (8, 2048, 2048, False), (5, 3584, 512, True),
                                                        (5, 3072, 1024, False), (7, 5120, 1024, True),
                                                        (4, 3584, 512, True)],
                         ids=["r3-llama3b-b8", "r2-qwen3-1.7b-b8", "r5-qwen14b-b4", "r6-qwen1.5b-b8",
                              "r1-smollm2-1.7b-b8", "r7-qwen7b-b5", "r3-llama3b-b5", "r5-qwen14b-b7-two-waves",
                              "r7-qwen7b-b4-below-grid-rule"])
def test_forward_default_with_partial_groups(batch, d_inner, d_xb, want_v7):
    """Heads per group not a multiple of 4 (sessions 19, 29): the default runs v7 where its blocks' estimate beats v5's
    (one wave of blocks with 3 / 2 busy warps: r = 3, 2 at b8; r = 5 at b4, 3 + 2 heads per group; r = 7 at b5, 4 + 3
    heads at 3 blocks per SM, where v5 steps to 4 lanes and two partial waves; r = 5 at b7, two waves) and v5 where it
    does not (r = 6 at b8: 2 blocks per SM of 3 heads take v7's latency floor; r = 1: 4 times the blocks; r = 3 at
    b5: 3 blocks per SM of 3 heads) - scan_api.cpp's tables fitted on the H100's 132 SMs
    (bench/results/s29/dispatch_groups/). Measured margins: >= 8 % between the two kernels, except r = 5 at b7 (5 %)
    and r = 7 at b4 (4 %: v7 below the full-group grid rule, the session-29 branch)."""
    if torch.cuda.get_device_properties(0).multi_processor_count != 132:
        pytest.skip("the expected choices are the H100's (132 SMs)")
    args, kw = make_inputs(batch, 64, d_inner, d_xb, dtype=torch.bfloat16, device="cuda", dt_rank=16, seed=11)
    names = _cuda_kernels_run(lambda: mixer_scan(**args, **kw))
    assert any("mixer_scan_fwd7_kernel" in n for n in names) == want_v7, names
    assert any("mixer_scan_fwd4_kernel" in n for n in names) != want_v7, names


@gpu
@needs_kernel
@pytest.mark.parametrize("extra", ["misaligned", "fp32"])
def test_forward_v7_falls_back_where_it_does_not_apply(extra, monkeypatch):
    monkeypatch.setenv("APRIEL_SCAN_FWD", "v7")
    dtype = torch.float32 if extra == "fp32" else torch.bfloat16
    args, kw = make_inputs(2, 70, 64, 16, dtype=dtype, device="cuda", dt_rank=16, seed=3)
    seq = packed_seq_idx(2, 70, [20, 41], "cuda") if extra == "packed" else None
    if extra == "misaligned":
        for name in ("zxbc", "dt_low"):
            t = args[name]
            base = torch.full((2, 70, t.shape[-1] + 3), float("nan"), dtype=dtype, device="cuda")
            base[..., 1:1 + t.shape[-1]] = t
            args[name] = base[..., 1:1 + t.shape[-1]]
    out = {}
    names = _cuda_kernels_run(lambda: out.update(r=mixer_scan(**args, **kw, seq_idx=seq, return_final_states=True)))
    assert not any("mixer_scan_fwd7_kernel" in n for n in names), names
    assert any("mixer_scan_fwd4_kernel" in n for n in names), names
    ref64 = ref_mixer(to64(args), kw, seq_idx=seq, return_final_states=True)
    ref_lp = ref_mixer(args, kw, seq_idx=seq, return_final_states=True)
    for name, o, r64, rlp in zip(("y", "final_ssm", "final_conv"), out["r"], ref64, ref_lp):
        check(name, o, r64, rlp, floor=2e-5 if dtype == torch.float32 else 1e-3)


# Backward versions (APRIEL_SCAN_BWD, read by the host at each call): v4 (mixer_scan_bwd4.cuh), v7 (the tensor-core
# backward, mixer_scan_bwd7.cuh; v4 where it does not apply) and v3 (the session-1 kernel). Every GPU gradient test
# runs all three; the default dispatch (v7 for large grids) has its own test.
BWD_VERSIONS = ["v4", "v7", "v3"]


@pytest.fixture(params=BWD_VERSIONS)
def bwd_version(request, monkeypatch):
    monkeypatch.setenv("APRIEL_SCAN_BWD", request.param)
    return request.param


GRAD_CASES = [
    (1, 1, 64, 16, True, "init"),
    (2, 33, 64, 16, False, "init"),
    (3, 65, 256, 64, True, "init_D"),
    (2, 97, 64, 16, True, "packed"),
    (1, 130, 256, 64, False, "strided"),
    (1, 2049, 64, 16, True, "init"),
    (2, 50, 64, 32, True, "init"),    # 2 heads per x / B group (the head sums of dx / dB, session 5's epilogue kernel)
    (1, 45, 32, 32, False, "init"),   # 1 head per group
]


def _grads(args, kw, seq, weights):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}
    y, ssm, conv = mixer_scan(**leaves, **kw, seq_idx=seq, return_final_states=True)
    loss = (y.double() * weights[0]).sum() + (ssm.double() * weights[1]).sum() + (conv.double() * weights[2]).sum()
    loss.backward()
    return {k: v.grad for k, v in leaves.items()}


def _ref_grads(args, kw, seq, weights):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}
    y, ssm, conv = ref_mixer(leaves, kw, seq_idx=seq, return_final_states=True)
    loss = (y.double() * weights[0]).sum() + (ssm.double() * weights[1]).sum() + (conv.double() * weights[2]).sum()
    loss.backward()
    return {k: v.grad for k, v in leaves.items()}


@gpu
@needs_kernel
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_backward_segments_env_rejected(value, monkeypatch):
    """APRIEL_SCAN_BWD_SEGMENTS must be a positive integer: a ValueError naming it (raised in Python: the C++ check's
    exception would kill the GPU machine's process)."""
    args, kw = make_inputs(1, 64, 64, 16, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv("APRIEL_SCAN_BWD_SEGMENTS", value)
    with pytest.raises(ValueError, match="APRIEL_SCAN_BWD_SEGMENTS"):
        _grads(args, kw, None, (1.0, 1.0, 1.0))


@gpu
@needs_kernel
@pytest.mark.parametrize("version", ["v4k4", "v4k8", "v3", "v5k4", "v5k8"])
def test_gradient_parity_with_each_forward_version(version, bwd_version, monkeypatch):
    """The backward consumes the forward's state checkpoints: each forward version must write them right."""
    monkeypatch.setenv("APRIEL_SCAN_FWD", version)
    test_gradient_parity((2, 97, 64, 16, True, "packed"), torch.bfloat16, bwd_version)
    test_gradient_parity((1, 130, 256, 64, False, "init"), torch.float32, bwd_version)


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("case", [(2, 97, 64, 16, True, "init"), (1, 130, 256, 64, False, "strided"),
                                  (3, 65, 256, 64, True, "init_D"), (2, 97, 64, 16, True, "packed"),
                                  (2, 97, 48, 16, True, "init"), (2, 97, 96, 16, False, "packed")],
                         ids=["b2-L97-init", "b1-L130-strided", "b3-L65-initD", "b2-L97-packed", "b2-L97-r3-init",
                              "b2-L97-r6-packed"])
def test_gradient_parity_forward_v7(case, dtype, bwd_version, monkeypatch):
    """The backward recomputes from the forward's checkpoints: v7 writes them in its own (tensor-core) layout."""
    monkeypatch.setenv("APRIEL_SCAN_FWD", "v7")
    args, kw, seq = _case_inputs(case, dtype)
    names = _cuda_kernels_run(lambda: mixer_scan(**args, **kw))
    assert any("mixer_scan_fwd7_kernel" in n for n in names), names
    _check_grads(args, kw, seq, dtype)


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"b{c[0]}-L{c[1]}-D{c[2]}-X{c[3]}-{'rep' if c[4] else 'norep'}-{c[5] or 'plain'}")
def test_gradient_parity(case, dtype, bwd_version):
    args, kw, seq = _case_inputs(case, dtype)
    _check_grads(args, kw, seq, dtype)


def _loss_weights(args, kw, dtype, seed):
    """Random float64 weights of the loss sum(y w0) + sum(final_ssm w1) + sum(final_conv w2); w0 / w2 are rounded to
    the activation dtype (the dy / d final conv state the kernel sees, as in training)."""
    b, L = args["zxbc"].shape[:2]
    D_, X = kw["d_inner"], kw["d_xb"]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weights = (torch.randn(b, L, D_, device="cuda", generator=gen, dtype=torch.float64),
               torch.randn(b, D_ // N, N, N, device="cuda", generator=gen, dtype=torch.float64),
               torch.randn(b, X, args["conv_weight"].shape[1] - 1, device="cuda", generator=gen, dtype=torch.float64))
    return weights[0].to(dtype).double(), weights[1], weights[2].to(dtype).double()


def _check_grads(args, kw, seq, dtype):
    weights = _loss_weights(args, kw, dtype, seed=1)
    poison_allocator()
    got = _grads(args, kw, seq, weights)
    ref64 = _ref_grads(to64(args), kw, seq, weights)
    ref_lp = _ref_grads(args, kw, seq, weights)
    for name in args:
        check(f"d{name}", got[name], ref64[name], ref_lp[name], k=3.0, floor=5e-5 if dtype == torch.float32 else 2e-3)


# Shapes that reach the backward v4's less common paths: conv widths 2 / 3; dt_rank 12 (plain-load staging of
# dt_low), 24 and 32 (second mma k-step); odd element offsets (no 16-byte copies of zxbc / dt_low: plain-load
# staging); ragged last tiles of 1 and 31 tokens (the transposed conv reads the first rows of a
# ragged next tile); document starts on, just before and just after tile boundaries (state reset and conv
# window across the halo), with initial states; batch 3.
GRAD_VARIANT_CASES = [
    # (batch, seqlen, d_inner, d_xb, repeat, width, dt_rank, cuts, extras)
    (2, 33, 64, 16, True, 2, 8, (), "init"),
    (1, 95, 256, 64, False, 3, 12, (31, 32, 64), "init"),
    (3, 97, 64, 16, True, 4, 24, (32, 33, 63), "init"),
    (2, 70, 128, 32, False, 4, 32, (1, 34), "init_misaligned"),
    (1, 129, 64, 16, True, 4, 16, (30, 96, 127), "misaligned"),
    (2, 66, 64, 16, False, 3, 16, (2, 65), "init"),
]


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", GRAD_VARIANT_CASES,
                         ids=lambda c: f"b{c[0]}-L{c[1]}-D{c[2]}-{'rep' if c[4] else 'norep'}-W{c[5]}-R{c[6]}-cuts{len(c[7])}-{c[8]}")
def test_gradient_parity_backward_shapes(case, dtype, bwd_version):
    b, L, D_, X, repeat, width, rank, cuts, extra = case
    args, kw = make_inputs(b, L, D_, X, dtype=dtype, device="cuda", repeat=repeat, dt_rank=rank, width=width,
                           initial_states="init" in extra, seed=11)
    if "misaligned" in extra:  # odd element offsets: no 16-byte copies possible (plain-load staging)
        for name in ("zxbc", "dt_low"):
            t = args[name]
            base = torch.full((b, L, t.shape[-1] + 3), float("nan"), dtype=dtype, device="cuda")
            base[..., 1:1 + t.shape[-1]] = t
            args[name] = base[..., 1:1 + t.shape[-1]]
    seq = packed_seq_idx(b, L, list(cuts), "cuda") if cuts else None
    _check_grads(args, kw, seq, dtype)


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_gradient_parity_bwd4_f32_bc(dtype, monkeypatch):
    """v4's A/B variant that reads fp32 copies of B / C (APRIEL_SCAN_BWD_BC=f32) instead of the raw tile."""
    monkeypatch.setenv("APRIEL_SCAN_BWD", "v4")
    monkeypatch.setenv("APRIEL_SCAN_BWD_BC", "f32")
    test_gradient_parity_backward_shapes(GRAD_VARIANT_CASES[2], dtype, "v4")
    test_gradient_parity((3, 65, 256, 64, True, "init_D"), dtype, "v4")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / (b.double().norm() + 1e-30)).item()


@gpu
@needs_kernel
@pytest.mark.parametrize("repeat", [True, False], ids=["repeat", "no_repeat"])
def test_backward_v4_agrees_with_v3_at_bench_shape(repeat, monkeypatch):
    """The bench shape (D 4096 / X 1024, bf16) at an odd length with packed documents and initial states: v4's
    gradients match v3's up to fp32 summation order (then the output dtype's rounding), and v4 is bitwise
    deterministic there (no atomics; fixed reduction orders)."""
    L = 4097
    args, kw = make_inputs(1, L, 4096, 1024, dtype=torch.bfloat16, device="cuda", repeat=repeat, dt_rank=16,
                           initial_states=True, seed=3)
    seq = packed_seq_idx(1, L, [1000, 1031, 2048, 4000], "cuda")
    gen = torch.Generator(device="cuda").manual_seed(2)
    weights = (torch.randn(1, L, 4096, device="cuda", generator=gen, dtype=torch.float64).to(torch.bfloat16).double(),
               torch.randn(1, 256, N, N, device="cuda", generator=gen, dtype=torch.float64),
               torch.randn(1, 1024, 3, device="cuda", generator=gen, dtype=torch.float64))
    got = {}
    for version in ("v3", "v4", "v4"):
        monkeypatch.setenv("APRIEL_SCAN_BWD", version)
        poison_allocator()
        g = _grads(args, kw, seq, weights)
        if version in got:
            for name in args:
                assert torch.equal(g[name], got[version][name]), f"v4 d{name} differs between runs"
        got[version] = g
    for name in args:
        a, b_ = got["v4"][name], got["v3"][name]
        assert torch.isfinite(a).all(), f"d{name}: non-finite values"
        scale = b_.abs().max().item()
        assert scale > 0, f"d{name}: v3 gradient is zero"
        # activations' gradients are bf16 (one rounding: ~2e-3 relative rms); parameters fp32-accumulated
        assert _rel(a, b_) <= 5e-3, f"d{name}: relative error {_rel(a, b_):.2e} between v4 and v3"
        assert err(a, b_) <= 2e-2 * scale, f"d{name}: max error {err(a, b_):.3e} vs scale {scale:.3e}"


@gpu
@needs_kernel
@pytest.mark.parametrize("repeat", [True, False], ids=["repeat", "no_repeat"])
def test_continuity_split_and_step(repeat, monkeypatch):
    # mixer_step's CUDA kernel belongs to another family: compare with whatever it dispatches to
    from apriel_kernels._ext import has_kernel

    if not has_kernel("mixer_step"):
        monkeypatch.setenv("APRIEL_KERNELS_ALLOW_REFERENCE", "1")
    args, kw = make_inputs(2, 100, 256, 64, dtype=torch.float32, device="cuda", repeat=repeat, initial_states=True)
    y, ssm, conv = mixer_scan(**args, **kw, return_final_states=True)
    first = {k: (v[:, :70] if k in ("zxbc", "dt_low") else v) for k, v in args.items()}
    ya, sa, ca = mixer_scan(**first, **kw, return_final_states=True)
    rest = {k: v for k, v in args.items() if "initial" not in k}
    yb, sb, cb = mixer_scan(**{k: (v[:, 70:] if k in ("zxbc", "dt_low") else v) for k, v in rest.items()}, **kw,
                            initial_ssm_state=sa, initial_conv_state=ca, return_final_states=True)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sb, ssm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cb, conv)
    # prefill 70 tokens, then 30 decode steps through mixer_step (whatever it dispatches to)
    conv_state, ssm_state = ca.clone(), sa.clone()
    params = {k: v for k, v in rest.items() if k not in ("zxbc", "dt_low")}
    steps = []
    for t in range(70, 100):
        steps.append(mixer_step(args["zxbc"][:, t], args["dt_low"][:, t], conv_state, ssm_state, None, **params, **kw))
    torch.testing.assert_close(torch.stack(steps, 1), y[:, 70:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ssm_state, ssm, rtol=1e-4, atol=1e-4)


@gpu
@needs_kernel
@pytest.mark.parametrize("version", ["auto", "v7", "v7var", "auto-long"])
def test_packed_equals_separate(version, monkeypatch):
    """Documents packed in one row give each document's separate call bitwise (v7: its document support, session
    12 - restarts mid-tile, a one-token document; v7var: varlen scheduling, session 17). auto at batch 1: the varlen
    plan picks v7 for these short documents, so the separate calls are v7's; auto-long (one document of 750 of 800
    tokens): the plan keeps v5, whose separate calls run v5 too."""
    L = 800
    cuts = ([0, 37, 38, 100, 140, 200, 260, 330, 380, 430, 470, 520, 570, 630, 680, 720, 760, L]
            if version != "auto-long" else [0, 25, 775, L])
    args, kw = make_inputs(1, L, 256, 64, dtype=torch.bfloat16, device="cuda", dt_rank=16)
    seq = packed_seq_idx(1, L, cuts[1:-1], "cuda")
    if version.startswith("auto"):
        assert varlen_plan(seq, 256)["varlen"] == (version == "auto")
    else:
        monkeypatch.setenv("APRIEL_SCAN_FWD", version)
    y, ssm, conv = mixer_scan(**args, **kw, seq_idx=seq, return_final_states=True)
    if version == "auto":
        monkeypatch.setenv("APRIEL_SCAN_FWD", "v7")  # the separate calls of what the plan picked
    for a, b_ in zip(cuts[:-1], cuts[1:]):
        part = {k: (v[:, a:b_] if k in ("zxbc", "dt_low") else v) for k, v in args.items()}
        yp, sp, cp = mixer_scan(**part, **kw, return_final_states=True)
        torch.testing.assert_close(y[:, a:b_], yp, rtol=0, atol=0)
    torch.testing.assert_close(ssm, sp, rtol=0, atol=0)
    torch.testing.assert_close(conv, cp, rtol=0, atol=0)


# Varlen scheduling of packed documents (session 17: csrc/scan/mixer_scan_plan.cu lists the documents on the device
# and picks the varlen v7 kernel - blocks over (channel group, document) - or the kernel the dispatcher runs
# otherwise; mixer_scan_fwd7.cuh kVar). The varlen kernel must give the v7 kernel with documents bit for bit: y, the
# final states AND the checkpoints (the backward reads them), whichever block wrote them.
def _expected_documents(seq):
    """(sequence, first token, end token) of every document of seq_idx (a start wherever the id changes)."""
    docs = []
    for b, row in enumerate(seq.tolist()):
        starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]]
        docs += [(b, s_, e) for s_, e in zip(starts, starts[1:] + [len(row)])]
    return docs


def test_varlen_plan_rejects_bad_input():
    seq = torch.zeros(1, 10, dtype=torch.int32)
    with pytest.raises((TypeError, ValueError), match="seq_idx"):
        varlen_plan(seq.long(), 256)
    with pytest.raises((TypeError, ValueError), match="seq_idx"):
        varlen_plan(seq[0], 256)
    with pytest.raises(ValueError, match="d_xb"):
        varlen_plan(seq, 96)  # d_xb 24 by default: not a multiple of 16
    with pytest.raises(ValueError, match="d_inner"):
        varlen_plan(seq, 100, d_xb=32)
    with pytest.raises(ValueError, match="seq_idx: expected a CUDA tensor"):
        varlen_plan(seq, 256)


# (batch, seqlen): the plan's search covers each row in steps of 4,096 tokens (4 per thread): short rows (7 tokens:
# most of a step's threads past the row's end) and rows of 5 steps (20,000 tokens: documents across the steps' edges).
@gpu
@needs_kernel
@pytest.mark.parametrize("shape", [(3, 1000), (5, 7), (2, 20000)], ids=lambda s: f"b{s[0]}-L{s[1]}")
def test_varlen_plan_lists_documents_longest_first(shape):
    batch, L = shape
    g = torch.Generator().manual_seed(3)
    seq = torch.zeros(batch, L, dtype=torch.int32)
    for b in range(batch):
        for c in sorted(set(torch.randint(1, L, (20,), generator=g).tolist())):
            seq[b, c:] += 1
    seq[-1] %= 2  # ids 0 / 1 alternating: a document starts at every change, not only where the id grows
    plan = varlen_plan(seq.cuda(), 256, force=True)
    assert plan["varlen"]
    expected = sorted(_expected_documents(seq), key=lambda d: (d[1] - d[2], d[0], d[1]))  # longest first, then order
    assert [tuple(r) for r in plan["documents"].tolist()] == expected


@gpu
@needs_kernel
def test_varlen_plan_decides_by_document_length():
    L = 8192
    short = packed_seq_idx(1, L, list(range(1024, L, 1024)), "cuda")  # 8 documents of 1,024 tokens
    assert varlen_plan(short, 4096)["varlen"]  # 512 blocks of 1,024 tokens beat the batch-1 kernel's 8,192
    one = torch.zeros(1, L, dtype=torch.int32, device="cuda")
    assert not varlen_plan(one, 4096)["varlen"]  # one document: one block per group would run all 8,192 tokens
    assert varlen_plan(one, 4096, force=True)["varlen"]
    many = torch.arange(VARLEN_MAX_DOCUMENTS + 1, dtype=torch.int32, device="cuda").unsqueeze(0)
    plan = varlen_plan(many, 4096, force=True)  # more documents than the list holds: never varlen
    assert not plan["varlen"] and plan["documents"].shape == (0, 3)
    # SmolLM2-135M's mixer (D 576, 3 heads per group: 12 block columns, session 23): the batch-1-3 kernel runs a
    # tile in ~1.6 us at any of these batches (36-108 head rows leave the GPU mostly idle), so only short documents
    # pay for varlen (H100: b1 L8192 250-token documents 0.11 vs 0.40 ms; b3 L4096 1,000 tokens 0.33 vs 0.20)
    assert varlen_plan(packed_seq_idx(1, L, list(range(250, L, 250)), "cuda"), 576, d_xb=192)["varlen"]
    assert not varlen_plan(packed_seq_idx(3, 4096, list(range(1000, 4096, 1000)), "cuda"), 576, d_xb=192)["varlen"]
    assert not varlen_plan(packed_seq_idx(2, L, list(range(2000, L, 2000)), "cuda"), 576, d_xb=192)["varlen"]
    # Llama-3.2-3B's mixer (3 heads per column): a column's tile costs ~3 / 4 of a full one's at 4 blocks per SM (b2
    # L8192 250-token documents: varlen 0.53 vs 0.60 ms)
    assert varlen_plan(packed_seq_idx(2, L, list(range(250, L, 250)), "cuda"), 3072, d_xb=1024)["varlen"]


def _varlen_cuts(L, kind):
    if kind == "v7":  # v7_seq_idx's cuts: mid-tile, tile boundaries, one-token documents, rows 0-2 of a tile
        return sorted({c for c in (1, L // 4, L // 4 + 1, 32, 64, 94, 95, 157, 193, 226, L // 2 + 1, L - 1) if 0 < c < L})
    if kind == "aligned":  # every document ends on a tile boundary: the checkpoint after a document's last tile
        return list(range(32, L, 32))
    if kind == "tokens":  # documents of 2 tokens: more documents than blocks, each block takes several
        return list(range(2, L, 2))
    if kind == "250":  # documents of 250 tokens (the plan picks varlen at batch 1, D 4096)
        return list(range(250, L, 250))
    g = torch.Generator().manual_seed(L)
    return sorted(set(torch.randint(1, L, (max(1, L // 50),), generator=g).tolist()))


VARLEN_CASES = [
    # (batch, seqlen, d_inner, d_xb, width, dt_rank, extras, documents)
    (2, 77, 64, 16, 4, 16, "init_packed", "v7"),
    (2, 4097, 256, 64, 4, 16, "init_packed", "v7"),
    (3, 300, 4096, 1024, 4, 16, "packed", "v7"),  # 8 blocks per group take 39 documents
    (1, 1000, 256, 64, 3, 16, "norep_packed", "random"),
    (1, 160, 64, 16, 4, 16, "init_packed", "aligned"),
    (1, 3000, 4096, 1024, 4, 16, "init_packed", "random"),
    (1, 1200, 64, 16, 2, 8, "packed", "tokens"),  # 600 documents over 528 blocks
    (2, 300, 256, 64, 4, 16, "init_packed_blocks1", "v7"),  # one block per group takes every document in turn
    # heads per group not a multiple of 4 (session 23: kPartial block columns, warps without a head)
    (2, 300, 48, 16, 4, 16, "init_packed", "v7"),  # 3 per group, one group: a column of 3 heads
    (1, 1000, 192, 64, 3, 16, "norep_packed", "random"),  # 3 per group, 4 groups
    (2, 300, 80, 16, 4, 16, "init_packed_blocks1", "v7"),  # 5 per group: columns of 3 + 2 heads, one block each
    (1, 1200, 112, 16, 2, 8, "packed", "tokens"),  # 7 per group (4 + 3), 600 documents
    (1, 3000, 3072, 1024, 4, 16, "init_packed", "random"),  # Llama-3.2-3B's mixer (3 per group)
]


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"b{c[0]}-L{c[1]}-D{c[2]}-W{c[4]}-R{c[5]}-{c[6]}-{c[7]}")
def test_forward_varlen_bitwise_equals_v7_documents(case, dtype, monkeypatch):
    b, L, D_, X, width, rank, extra, kind = case
    cuts = _varlen_cuts(L, kind)
    if "blocks1" in extra:  # the staging barriers' phases and the parities run on across a block's documents
        monkeypatch.setenv("APRIEL_SCAN_VARLEN_BLOCKS", "1")
    assert varlen_plan(packed_seq_idx(b, L, cuts, "cuda"), D_, force=True, d_xb=X)["varlen"]  # v7var runs varlen
    _fwd_outputs_bitwise_equal((None, b, L, D_, X, width, rank, extra), dtype, ("v7", "v7var"), monkeypatch, cuts=cuts)


@gpu
@needs_kernel
@pytest.mark.parametrize("dims", [(4096, 1024), (3072, 1024)], ids=["apriel", "llama3b-r3"])
def test_forward_varlen_auto_parity_and_gradients(dims, monkeypatch):
    """Batch 1 with short documents: the default dispatch runs varlen (the plan says so; with 3 heads per group too,
    session 23); y and the final states match float64, and the gradients (the backward reads varlen's checkpoints)
    equal those after the v7 forward with documents bit for bit."""
    b, L = 1, 2000
    D_, X = dims
    args, kw = make_inputs(b, L, D_, X, dtype=torch.bfloat16, device="cuda", dt_rank=16, initial_states=True, seed=9)
    seq = packed_seq_idx(b, L, _varlen_cuts(L, "250"), "cuda")
    assert varlen_plan(seq, D_, d_xb=X)["varlen"]
    names = _cuda_kernels_run(lambda: mixer_scan(**args, **kw, seq_idx=seq))
    assert any("mixer_scan_fwd7_kernel" in n for n in names), names
    poison_allocator()
    y, ssm, conv = mixer_scan(**args, **kw, seq_idx=seq, return_final_states=True)
    ref64 = ref_mixer(to64(args), kw, seq_idx=seq, return_final_states=True)
    ref_lp = ref_mixer(args, kw, seq_idx=seq, return_final_states=True)
    for name, o, r64, rlp in zip(("y", "final_ssm", "final_conv"), (y, ssm, conv), ref64, ref_lp):
        check(name, o, r64, rlp, floor=1e-3)
    weights = (torch.randn(b, L, D_, device="cuda", dtype=torch.float64),
               torch.randn(b, D_ // N, N, N, device="cuda", dtype=torch.float64),
               torch.randn(b, X, 3, device="cuda", dtype=torch.float64))
    auto = _grads(args, kw, seq, weights)
    monkeypatch.setenv("APRIEL_SCAN_FWD", "v7")
    v7 = _grads(args, kw, seq, weights)
    for name in auto:
        assert torch.equal(auto[name], v7[name]), f"d{name}: varlen forward's checkpoints gave other gradients"


@gpu
@needs_kernel
def test_forward_varlen_cuda_graph_follows_the_documents():
    """The plan runs on the device: one captured graph replays right for short documents (varlen) and for one long
    document (the batch-1 kernel) - no host decision is baked into the capture."""
    b, L = 1, 2000
    args, kw = make_inputs(b, L, 4096, 1024, dtype=torch.bfloat16, device="cuda", dt_rank=16, seed=4)
    short = packed_seq_idx(b, L, _varlen_cuts(L, "250"), "cuda")
    long = packed_seq_idx(b, L, [100], "cuda")
    assert varlen_plan(short, 4096)["varlen"] and not varlen_plan(long, 4096)["varlen"]
    static = {k: v.clone() for k, v in args.items()}
    static_seq = short.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mixer_scan(**static, **kw, seq_idx=static_seq)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mixer_scan(**static, **kw, seq_idx=static_seq, return_final_states=True)
    for seq in (long, short, long):
        static_seq.copy_(seq)
        graph.replay()
        eager = mixer_scan(**args, **kw, seq_idx=seq, return_final_states=True)
        for o, e in zip(out, eager):
            torch.testing.assert_close(o, e, rtol=0, atol=0)


@gpu
@needs_kernel
def test_deterministic_bitwise(bwd_version):
    args, kw = make_inputs(2, 777, 256, 64, dtype=torch.bfloat16, device="cuda", dt_rank=16, initial_states=True)
    seq = packed_seq_idx(2, 777, [300], "cuda")
    weights = (torch.randn(2, 777, 256, device="cuda", dtype=torch.float64), torch.randn(2, 16, N, N, device="cuda",
               dtype=torch.float64), torch.randn(2, 64, 3, device="cuda", dtype=torch.float64))
    runs = [_grads(args, kw, seq, weights) for _ in range(2)]
    for name in args:
        assert torch.equal(runs[0][name], runs[1][name]), f"d{name} differs between runs"


def _force_bwd_v7(monkeypatch, segments):
    """The v7 backward with a segment count ("auto": the default sequence split)."""
    monkeypatch.setenv("APRIEL_SCAN_BWD", "v7")
    if segments == "auto":
        monkeypatch.delenv("APRIEL_SCAN_BWD_SEGMENTS", raising=False)
    else:
        monkeypatch.setenv("APRIEL_SCAN_BWD_SEGMENTS", segments)


def _check_grads_repeatable(args, kw, weights, seq=None):
    """Every gradient vs float64 (16-bit tolerance) and bitwise equal across two runs on a poisoned allocator."""
    poison_allocator()
    got = _grads(args, kw, seq, weights)
    again = _grads(args, kw, seq, weights)
    ref64 = _ref_grads(to64(args), kw, seq, weights)
    ref_lp = _ref_grads(args, kw, seq, weights)
    for name in args:
        assert torch.equal(got[name], again[name]), f"d{name} differs between runs"
        check(f"d{name}", got[name], ref64[name], ref_lp[name], k=3.0, floor=2e-3)


# The backward v7 (tensor cores, one warp per head, 8-token sub-chunks): shapes that reach its sub-chunk and tile
# boundaries (L 1 / 9 / 31 / 33 / 1000 / 4097: ragged sub-chunks and tiles, pass A over 0-3 sub-chunks), both repeat
# settings, conv widths 2-4, 8 heads per group (two blocks per group), strided inputs, the model's shape (D 4096).
BWD7_CASES = [
    # (batch, seqlen, d_inner, d_xb, repeat, width, dt_rank, extras)
    (1, 1, 64, 16, True, 4, 8, "init"),
    (2, 9, 64, 16, False, 2, 16, "init"),
    (1, 31, 256, 64, True, 3, 16, ""),
    (3, 33, 128, 16, False, 4, 16, "init"),
    (2, 1000, 256, 64, True, 4, 16, "init"),
    (1, 4097, 64, 16, False, 4, 8, ""),
    (2, 300, 4096, 1024, True, 4, 16, "init"),
    (2, 70, 256, 64, True, 4, 16, "strided"),
    # heads per group not a multiple of 4 (session 20, kSpan: blocks of 4 consecutive heads across group boundaries,
    # the last block with fewer heads when 4 does not divide the head count; dB / d(conv input) in group parts: one
    # per (block, group), session 21)
    (2, 77, 48, 16, True, 4, 16, "init"),  # 3 heads per group, one block of 3 heads
    (3, 100, 192, 64, False, 3, 16, "init"),  # 3 per group, 4 groups: blocks of 3 + 1, 2 + 2, 1 + 3 heads
    (2, 300, 112, 16, True, 4, 16, "strided"),  # 7, one group: blocks of 4 and 3 heads
    (1, 150, 224, 32, False, 4, 8, "init"),  # 7, two groups: 4, 3 + 1, 4, 2 heads
    (1, 129, 80, 16, False, 4, 8, "init"),  # 5, one group: 4 and 1 heads
    (2, 200, 160, 32, True, 3, 16, "init"),  # 5, two groups: 4, 1 + 3, 2 heads
    (2, 65, 32, 16, True, 2, 16, "init"),  # 2, one block of 2 heads
    (2, 150, 96, 48, False, 4, 16, "init"),  # 2, three groups: 2 + 2, then a block of 2 heads
    (2, 300, 128, 64, False, 4, 16, "init"),  # 2, four groups: two whole groups per block, fused group sums
    (1, 300, 2048, 1024, True, 4, 16, "init"),  # Qwen3-1.7B's mixer (2 per group, fused)
    (2, 300, 3072, 1024, True, 4, 16, "init"),  # Llama-3.2-3B's mixer
    (2, 300, 192, 16, False, 4, 16, "init"),  # 12 per group: the kSpan kernel with 3 blocks (parts) in one group
    # one head per group (session 24, kMulti: a block's 4 heads are 4 whole groups; groups 1-3's x / B from global)
    (2, 77, 64, 64, True, 4, 16, "init"),  # one block
    (3, 100, 128, 128, False, 3, 16, "init"),  # two blocks, width 3
    (1, 33, 64, 64, False, 2, 8, "strided"),
    (2, 300, 2048, 2048, True, 4, 16, "init"),  # SmolLM2-1.7B's mixer (MHA)
]


@gpu
@needs_kernel
@pytest.mark.parametrize("segments", ["auto", "1"], ids=["seg-auto", "seg-1"])
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("case", BWD7_CASES, ids=lambda c: f"b{c[0]}-L{c[1]}-D{c[2]}-X{c[3]}-{'rep' if c[4] else 'norep'}-W{c[5]}-R{c[6]}-{c[7] or 'plain'}")
def test_backward_v7_parity_and_determinism(case, dtype, segments, monkeypatch):
    """v7 runs (torch profiler), matches float64 for every gradient, and is bitwise repeatable - unsplit ("1") and
    with the default sequence split (small grids: the split applies wherever the sequence has >= 2 tiles)."""
    b, L, D_, X, repeat, width, rank, extra = case
    _force_bwd_v7(monkeypatch, segments)
    args, kw = make_inputs(b, L, D_, X, dtype=dtype, device="cuda", repeat=repeat, dt_rank=rank, width=width,
                           initial_states="init" in extra, strided=extra == "strided", seed=21)
    weights = _loss_weights(args, kw, dtype, seed=2)
    names = _cuda_kernels_run(lambda: _grads(args, kw, None, weights))
    assert any("mixer_scan_bwd7_kernel" in n for n in names), names
    assert not any("mixer_scan_bwd4_kernel" in n for n in names), names
    _check_grads_repeatable(args, kw, weights)


# The v7 backward's sequence split with forced segment counts: segment boundaries at tile edges, a last segment
# shorter than the conv halo (L 65 in 3 segments: the final conv state's gradient lands in segment 1's edge rows),
# conv widths 2-4, both repeat settings, 8 heads per group (group parts: the halo rows), a carry chain over 8
# segments, initial states (segment 0's gradients), dt_rank 8, strided inputs.
BWD7_SPLIT_CASES = [
    # (batch, seqlen, d_inner, d_xb, repeat, width, dt_rank, segments, extras)
    (2, 65, 64, 16, True, 4, 16, 3, "init"),
    (1, 300, 64, 16, False, 2, 16, 4, "init"),
    (2, 1000, 256, 64, True, 3, 8, 8, "init"),
    (3, 129, 128, 16, False, 4, 16, 2, "init"),
    (1, 4097, 256, 64, False, 4, 16, 5, ""),
    (2, 200, 256, 64, True, 4, 16, 7, "strided"),
    (2, 300, 96, 16, True, 4, 16, 3, "init"),  # 6 heads per group (blocks of 4 and 2): the split with kSpan
    (1, 300, 192, 32, False, 3, 16, 4, "init"),  # 6 per group, two groups (4, 2 + 2, 4 heads), 4 segments
    (2, 300, 128, 64, True, 4, 16, 3, "init"),  # 2 per group, fused group sums: the segments' dx_edge rows
    # 3 per group, 4 groups (blocks of 3 + 1, 2 + 2, 1 + 3 heads: parts, x_halo, the head-sum kernel); L 65 in 3
    # segments: the final conv state's gradient lands in segment 1's edge rows
    (2, 65, 192, 64, True, 4, 16, 3, "init"),
    (1, 300, 96, 32, False, 2, 16, 4, "init"),  # 3 per group, 2 groups, width 2, 4 segments
    (2, 65, 128, 128, True, 4, 16, 3, "init"),  # one head per group (kMulti): the segments' dx_edge rows per group
    (1, 300, 64, 64, False, 2, 16, 4, "init"),  # one per group, width 2, 4 segments
]


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("case", BWD7_SPLIT_CASES, ids=lambda c: f"b{c[0]}-L{c[1]}-D{c[2]}-X{c[3]}-{'rep' if c[4] else 'norep'}-W{c[5]}-R{c[6]}-S{c[7]}-{c[8] or 'plain'}")
def test_backward_v7_sequence_split(case, dtype, monkeypatch):
    """The split runs (carry pre-pass kernel in the profile), matches float64 for every gradient (initial / final
    states included) and is bitwise repeatable."""
    b, L, D_, X, repeat, width, rank, segments, extra = case
    monkeypatch.setenv("APRIEL_SCAN_BWD", "v7")
    monkeypatch.setenv("APRIEL_SCAN_BWD_SEGMENTS", str(segments))
    args, kw = make_inputs(b, L, D_, X, dtype=dtype, device="cuda", repeat=repeat, dt_rank=rank, width=width,
                           initial_states="init" in extra, strided=extra == "strided", seed=23)
    weights = _loss_weights(args, kw, dtype, seed=5)
    names = _cuda_kernels_run(lambda: _grads(args, kw, None, weights))
    assert any("mixer_scan_bwd7_carry_kernel" in n for n in names), names
    assert any("mixer_scan_bwd7_kernel" in n for n in names), names
    _check_grads_repeatable(args, kw, weights)



# Sub-chunk checkpoints (session 30, APRIEL_SCAN_CKPT=sub / sub-always): the v7 forward also saves the states after
# tokens 7, 15, 23 of every 32-token tile, and the v7 backward loads them instead of recomputing them from the tile's
# checkpoint (pass A). Since session 31 the v5 forward writes them too (K = 8 with TMA staging, K = 4), and the varlen
# v7 forward for whole groups of 4 heads (each row by the block whose document holds its token).
# Shapes: ragged last tiles (L 9 / 33 / 1000 / 4097: sub-chunks past the sequence end), 8 heads per group, 3 / 7 / 2 / 1
# heads per group (kPartial forward; kSpan / kMulti backward), packed documents (kSeq), initial states, a forced split.
SUB_CKPT_CASES = [
    # (batch, seqlen, d_inner, d_xb, repeat, width, dt_rank, segments, extras)
    (2, 9, 64, 16, False, 2, 16, "1", "init"),
    (3, 33, 128, 16, False, 4, 16, "1", "init"),
    (2, 1000, 256, 64, True, 4, 16, "auto", "init"),
    (1, 4097, 64, 16, False, 4, 8, "1", ""),
    (2, 300, 4096, 1024, True, 4, 16, "1", "init"),
    (2, 300, 96, 16, True, 4, 16, "3", "init"),  # 6 per group, split in 3
    (3, 100, 192, 64, False, 3, 16, "1", "init"),  # 3 per group
    (2, 300, 128, 64, False, 4, 16, "1", "init"),  # 2 per group
    (2, 300, 2048, 2048, True, 4, 16, "1", "init"),  # 1 per group (SmolLM2-1.7B's): written, kMulti recomputes
    (2, 300, 256, 64, True, 4, 16, "1", "packed"),
]


def _forward_checkpoints(args, kw, seq):
    return mixer_scan_fwd(*_fwd_op_args(args, kw, seq))[3]


# (forced forward, case): v7, v5 K = 8 / K = 4 on every case, the varlen v7 (forced v7var) on the packed ones
SUB_CKPT_RUNS = [pytest.param(fwd, c, id=f"{fwd}-b{c[0]}-L{c[1]}-D{c[2]}-X{c[3]}-S{c[7]}-{c[8] or 'plain'}")
                 for fwd in ("v7", "v5k8", "v5k4", "v7var") for c in SUB_CKPT_CASES
                 if fwd != "v7var" or "packed" in c[8]]


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("forward,case", SUB_CKPT_RUNS)
def test_backward_v7_sub_checkpoints(forward, case, dtype, monkeypatch):
    """The forward writes the sub-chunk checkpoints and sets their flag; the backward that loads them matches float64
    for every gradient and is bitwise repeatable."""
    b, L, D_, X, repeat, width, rank, segments, extra = case
    monkeypatch.setenv("APRIEL_SCAN_CKPT", "sub-always")
    monkeypatch.setenv("APRIEL_SCAN_FWD", forward)
    _force_bwd_v7(monkeypatch, segments)
    args, kw = make_inputs(b, L, D_, X, dtype=dtype, device="cuda", repeat=repeat, dt_rank=rank, width=width,
                           initial_states="init" in extra, seed=41)
    seq = v7_seq_idx(b, L, extra)
    poison_allocator()
    ckpt = _forward_checkpoints(args, kw, seq)
    tile_rows = b * ((L + 31) // 32) * D_ * N
    assert ckpt.shape == (4 * tile_rows + 1,), ckpt.shape
    assert ckpt[-1].item() == 1.0, f"the {forward} forward did not flag its sub-chunk checkpoints"
    assert torch.isfinite(ckpt).all(), "a sub-chunk checkpoint was left unwritten"
    weights = _loss_weights(args, kw, dtype, seed=6)
    _check_grads_repeatable(args, kw, weights, seq)


@gpu
@needs_kernel
@pytest.mark.parametrize("case", [(2, 100, 128, 32, False, "v7"), (1, 77, 64, 16, True, "v7"),
                                  (2, 100, 128, 32, False, "v5k8"), (3, 77, 64, 16, False, "v5k4"),
                                  (1, 77, 64, 16, True, "v5k8"), (2, 100, 128, 32, True, "v7var")],
                         ids=["b2-L100", "b1-L77-packed", "b2-L100-v5k8", "b3-L77-v5k4", "b1-L77-packed-v5k8",
                              "b2-L100-packed-v7var"])
def test_sub_checkpoints_are_the_states_after_tokens_7_15_23(case, monkeypatch):
    """Each sub-chunk row equals the float64 reference's state after its token (the final state of that prefix)."""
    b, L, D_, X, packed, forward = case
    monkeypatch.setenv("APRIEL_SCAN_CKPT", "sub-always")
    monkeypatch.setenv("APRIEL_SCAN_FWD", forward)
    args, kw = make_inputs(b, L, D_, X, dtype=torch.bfloat16, device="cuda", initial_states=True, seed=43)
    seq = packed_seq_idx(b, L, [5, 30, 40], "cuda") if packed else None
    if forward in ("v5k8", "v7var"):  # the kernels with the rows (v5 K = 8: the TMA one; varlen: the plan's pick)
        names = _cuda_kernels_run(lambda: _forward_checkpoints(args, kw, seq))
        docs = "true" if packed else "false"
        want = ("mixer_scan_fwd4_kernel", f"8, 16, {docs}, true, 5, true, true>") if forward == "v5k8" else \
            ("mixer_scan_fwd7_kernel", "true, true, true, false, true>")
        assert any(want[0] in n and want[1] in n for n in names), names
    ckpt = _forward_checkpoints(args, kw, seq)
    assert ckpt[-1].item() == 1.0
    tiles = (L + 31) // 32
    tile_rows = b * tiles * D_ * N
    sub = ckpt[tile_rows:4 * tile_rows].view(b, tiles, 3, D_, N)
    a64 = to64(args)
    checked = 0
    for tile in range(tiles):
        for j in range(3):
            t = 32 * tile + 8 * j + 7
            if t >= L:
                continue
            prefix = {k: (v[:, :t + 1] if k in ("zxbc", "dt_low") else v) for k, v in a64.items()}
            _, ssm, _ = ref_mixer(prefix, kw, seq_idx=None if seq is None else seq[:, :t + 1], return_final_states=True)
            want = ssm.reshape(b, D_, N)
            got = sub[:, tile, j].double()
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= 2e-3 * scale, f"tile {tile} sub-chunk {j}"
            checked += 1
    assert checked >= 6


@gpu
@needs_kernel
@pytest.mark.parametrize("forward", ["v4", "v7-cp.async", "v7var-partial-packed"])
def test_sub_checkpoints_without_a_writing_forward_fall_back_to_pass_a(forward, monkeypatch):
    """A forward that writes no sub-chunk rows (forced v4; v7 staged by cp.async; the varlen v7 for 3 heads per group)
    leaves the flag at 0: the backward recomputes the states (its pass A) and its gradients are those of the tile
    checkpoints, bit for bit."""
    monkeypatch.setenv("APRIEL_SCAN_FWD", forward.split("-")[0])
    monkeypatch.setenv("APRIEL_SCAN_BWD", "v7")
    if "cp.async" in forward:
        monkeypatch.setenv("APRIEL_SCAN_TMA", "0")
    d_inner = 192 if "partial" in forward else 256
    args, kw = make_inputs(2, 300, d_inner, 64, dtype=torch.bfloat16, device="cuda", initial_states=True, seed=44)
    seq = v7_seq_idx(2, 300, forward)
    weights = _loss_weights(args, kw, torch.bfloat16, seed=7)
    monkeypatch.setenv("APRIEL_SCAN_CKPT", "sub-always")
    poison_allocator()
    ckpt = _forward_checkpoints(args, kw, seq)
    assert ckpt.dim() == 1 and ckpt[-1].item() == 0.0
    with_sub = _grads(args, kw, seq, weights)
    monkeypatch.setenv("APRIEL_SCAN_CKPT", "tile")
    assert _forward_checkpoints(args, kw, seq).dim() == 4
    tile_only = _grads(args, kw, seq, weights)
    for name in args:
        assert torch.equal(with_sub[name], tile_only[name]), f"d{name}"


@gpu
@needs_kernel
def test_sub_checkpoints_under_compile_and_cuda_graph(monkeypatch):
    """With sub-chunk checkpoints, torch.compile (AOT autograd saves the flat buffer by its fake) and a CUDA graph of
    forward + backward (the flag's zeroing and the backward's two launches replayed on new inputs) give eager's
    gradients bit for bit."""
    monkeypatch.setenv("APRIEL_SCAN_CKPT", "sub-always")
    monkeypatch.setenv("APRIEL_SCAN_FWD", "v7")
    monkeypatch.setenv("APRIEL_SCAN_BWD", "v7")
    args, kw = make_inputs(2, 129, 256, 64, dtype=torch.bfloat16, device="cuda", dt_rank=16, seed=47)
    fresh, _ = make_inputs(2, 129, 256, 64, dtype=torch.bfloat16, device="cuda", dt_rank=16, seed=48)
    dy = torch.randn(2, 129, 256, device="cuda", generator=torch.Generator(device="cuda").manual_seed(4)).bfloat16()

    def grads_of(fn, inputs):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
        return torch.autograd.grad(fn(leaves), list(leaves.values()), dy)

    eager = grads_of(lambda a: mixer_scan(**a, **kw), args)
    compiled = grads_of(torch.compile(lambda a: mixer_scan(**a, **kw), fullgraph=True), args)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)
    static = {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}

    def step():
        return torch.autograd.grad(mixer_scan(**static, **kw), list(static.values()), dy)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    with torch.no_grad():
        static["zxbc"].copy_(fresh["zxbc"])
    graph.replay()
    want = grads_of(lambda a: mixer_scan(**a, **kw), {**args, "zxbc": fresh["zxbc"]})
    for name, o, w in zip(static, out, want):
        assert torch.equal(o, w), f"d{name}: the graph's replay differs from eager"


@gpu
@needs_kernel
def test_checkpoint_mode_sub_follows_the_forward_dispatch(monkeypatch):
    """sub: sub-chunk checkpoints where the forward runs a kernel that writes them - v7 (by its grid rule for whole
    groups of 4 heads, the estimate for other head counts), v5 below it, the varlen plan's kernels for whole groups -
    but not dt_rank > 16, fp32, one head per group (the kMulti backward reads none) or the varlen plan with partial
    groups: tile checkpoints there; the fake (torch.compile) agrees with the kernel's buffer; unset: tile."""
    from apriel_kernels.mixer_scan import _checkpoint_mode
    monkeypatch.setenv("APRIEL_SCAN_CKPT", "sub")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    need = -(-19 * sms // 10)  # blocks of 64 channels
    nb, ns = need * 64 // 4096 + 1, max(1, (need - 1) * 64 // 4096)

    def mode(batch, d_inner, d_xb, dtype=torch.bfloat16, rank=16, docs=False):
        zxbc = torch.empty(batch, 1, 1, dtype=dtype, device="cuda")
        dt_low = torch.empty(batch, 1, rank, dtype=dtype, device="cuda")
        seq = torch.zeros(batch, 1, dtype=torch.int32, device="cuda") if docs else None
        return _checkpoint_mode(zxbc, dt_low, seq, d_inner, d_xb, True)

    assert mode(nb, 4096, 1024) == 2 and mode(nb, 4096, 1024, dtype=torch.float16) == 2
    assert mode(ns, 4096, 1024) == 2 and mode(1, 4096, 1024) == 2  # v5 below the grid rule (session 31)
    assert mode(nb, 4096, 1024, dtype=torch.float32) == 1 and mode(1, 4096, 1024, dtype=torch.float32) == 1
    assert mode(nb, 4096, 1024, rank=24) == 1 and mode(1, 4096, 1024, rank=24) == 1  # dt_rank <= 16 only
    assert mode(nb, 4096, 1024, docs=True) == 2  # v7 with documents
    assert mode(1, 4096, 1024, docs=True) == 2  # the varlen plan's kernels (v5 or the varlen v7)
    assert mode(1, 3072, 1024, docs=True) == 1  # ... but the varlen v7 for 3 heads per group writes none
    assert mode(1, 2048, 2048) == 1 and mode(nb, 2048, 2048) == 1  # one head per group: the kMulti backward
    if sms == 132:  # test_forward_default_with_partial_groups's H100 choices
        assert mode(8, 3072, 1024) == 2  # Llama-3.2-3B's mixer: v7
        assert mode(8, 1536, 256) == 2  # v5
    args, kw = make_inputs(nb, 40, 4096, 1024, dtype=torch.bfloat16, device="cuda", dt_rank=16, seed=45)
    assert _forward_checkpoints(args, kw, None)[-1].item() == 1.0
    torch.library.opcheck(mixer_scan_fwd, _fwd_op_args(args, kw, None), test_utils=("test_schema", "test_faketensor"))
    monkeypatch.delenv("APRIEL_SCAN_CKPT")
    assert mode(nb, 4096, 1024) == 1
    assert _forward_checkpoints(args, kw, None).dim() == 4


# The backward's prologue and epilogue (session 22): one kernel converts the parameters to fp32
# (mixer_scan_params.cu), one sums the parameter gradients' fp32 partial rows (and a split's halo rows) and stores each
# gradient in its parameter's dtype (mixer_scan_finalize.cu). Parameters in mixed dtypes must get exactly the float32
# parameters' gradients rounded to their own dtypes (the scan kernels see the same float32 values either way), and the
# v7 backward launches no torch reduction or copy.
FINALIZE_CASES = [
    # (batch, seqlen, d_inner, d_xb, repeat, backward, segments)
    (1, 300, 256, 64, False, "v7", 3),  # fused group sums: halo rows into dzxbc; conv sums over a group's heads
    (2, 300, 96, 32, True, "v7", 2),  # 3 heads per group: group parts, the halo rows to the head-sum kernel
    (2, 130, 64, 16, False, "v4", 1),  # v4: dt_proj's gradients by GEMMs, the rest by the epilogue kernel
]
PARAM_DTYPES = dict(conv_weight=torch.float16, conv_bias=torch.float64, dt_proj_weight=torch.float32,
                    dt_proj_bias=torch.bfloat16, A_log=torch.float64, D=torch.float32)

@gpu
@needs_kernel
@pytest.mark.parametrize("case", FINALIZE_CASES, ids=lambda c: f"b{c[0]}-L{c[1]}-D{c[2]}-X{c[3]}-{c[5]}-S{c[6]}")
def test_backward_epilogue_one_kernel_each_parameter_dtype(case, monkeypatch):
    b, L, D_, X, repeat, version, segments = case
    monkeypatch.setenv("APRIEL_SCAN_BWD", version)
    monkeypatch.setenv("APRIEL_SCAN_BWD_SEGMENTS", str(segments))
    args, kw = make_inputs(b, L, D_, X, dtype=torch.bfloat16, device="cuda", repeat=repeat, dt_rank=16, seed=31)
    mixed = {k: v.to(PARAM_DTYPES.get(k, v.dtype)) for k, v in args.items()}
    as_f32 = {k: (v.float() if k in PARAM_DTYPES else v) for k, v in mixed.items()}
    dy = torch.randn(b, L, D_, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3)).bfloat16()

    def forward(a):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in a.items()}
        return leaves, mixer_scan(**leaves, **kw)

    # the training layout (make_inputs: 16-bit parameters, fp32 A_log / D): no torch reduction or copy in the backward
    leaves, y = forward(args)
    names = _cuda_kernels_run(lambda: torch.autograd.grad(y, list(leaves.values()), dy))
    assert any("mixer_scan_finalize_kernel" in n for n in names), names
    assert any("mixer_scan_params_f32_kernel" in n for n in names), names  # the parameters' fp32 copies, one launch
    if version == "v7":
        assert any("mixer_scan_bwd7" in n for n in names), names
        assert not any("reduce_kernel" in n or "copy_kernel" in n for n in names), names
    leaves, y = forward(mixed)
    got = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy)))
    leaves32, y32 = forward(as_f32)
    want = dict(zip(leaves32, torch.autograd.grad(y32, list(leaves32.values()), dy)))
    for k, v in mixed.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, (k, got[k].dtype, got[k].shape)
        assert torch.isfinite(got[k]).all(), k
        assert torch.equal(got[k], want[k].to(v.dtype)), f"d{k}: differs from the float32 parameters' gradient"


# The v7 backward with packed documents (kSeq, session 13): document starts mid-tile, on tile and 8-token sub-chunk
# boundaries (t % 8 == 0: the sub-chunk's first token), one-token documents, starts at segment starts (L 300 in 3
# segments of 4 tiles: tokens 128 / 256) and 1-2 tokens after them (the conv halo crosses the segment edge), a last
# document shorter than the conv halo (the final conv state's gradient masked), widths 2-4, both repeat settings,
# 8 heads per group (group parts: dfinal_conv masked by the last document), initial states (the first document's),
# the model's shape.
BWD7_DOC_CASES = [
    # (batch, seqlen, d_inner, d_xb, repeat, width, dt_rank, segments, cuts, extras)
    (2, 97, 64, 16, True, 4, 16, "1", (1, 8, 32, 33, 95), "init"),
    (2, 300, 256, 64, True, 4, 16, "3", (16, 128, 129, 255, 257, 299), "init"),
    (1, 300, 64, 16, False, 2, 16, "4", (40, 41, 42, 224, 226), "init"),
    (3, 130, 128, 16, False, 3, 8, "2", (31, 64, 65, 129), "init"),
    (1, 1000, 256, 64, True, 4, 16, "auto", (100, 511, 512, 513, 999), ""),
    (2, 300, 4096, 1024, True, 4, 16, "auto", (64, 65, 200), "init"),
    # the carry pre-pass scans a segment only up to its first document start (session 18). L 2000 in 4 segments of
    # 512 tokens: the first start deep in segment 1 (its groups split tiles 16 .. 21), none in segment 2, one at
    # segment 3's first token; then starts on the first tile's second token (one tile for the whole pre-pass), mid
    # segment, on a segment's last token; L 5000 in 2 segments: the start past the search's first 2,048 tokens.
    (1, 2000, 256, 64, True, 4, 16, "4", (700, 1536, 1990), "init"),
    (2, 2000, 64, 16, False, 3, 16, "4", (513, 1100, 1101, 1535), ""),
    (1, 5000, 64, 16, True, 4, 16, "2", (300, 4900), ""),
    (2, 300, 48, 16, False, 4, 16, "3", (16, 128, 129, 255), "init"),  # 3 heads per group (kSpan, one group)
    (2, 300, 96, 32, True, 4, 16, "2", (16, 128, 129, 255), "init"),  # 3 per group, blocks of 3 + 1, 2 + 2 heads
    (2, 300, 128, 64, False, 4, 16, "3", (16, 128, 129, 298), "init"),  # 2 per group, fused group sums
    (2, 300, 96, 16, True, 3, 16, "3", (16, 128, 129, 298), "init"),  # 6 per group: parts over 2 blocks, halo rows
    (2, 300, 128, 128, True, 4, 16, "3", (16, 128, 129, 298), "init"),  # one head per group (kMulti)
    (2, 97, 64, 64, False, 3, 16, "1", (1, 8, 32, 33, 95), ""),  # one per group, unsplit
]


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("case", BWD7_DOC_CASES, ids=lambda c: f"b{c[0]}-L{c[1]}-D{c[2]}-X{c[3]}-{'rep' if c[4] else 'norep'}-W{c[5]}-R{c[6]}-S{c[7]}-{c[9] or 'plain'}")
def test_backward_v7_documents(case, dtype, monkeypatch):
    """Packed documents run the v7 backward (no v4 in the profile; the carry pre-pass where split), match float64
    for every gradient (initial / final states included) and are bitwise repeatable."""
    b, L, D_, X, repeat, width, rank, segments, cuts, extra = case
    _force_bwd_v7(monkeypatch, segments)
    args, kw = make_inputs(b, L, D_, X, dtype=dtype, device="cuda", repeat=repeat, dt_rank=rank, width=width,
                           initial_states="init" in extra, seed=41)
    seq = packed_seq_idx(b, L, list(cuts), "cuda")
    weights = _loss_weights(args, kw, dtype, seed=9)
    names = _cuda_kernels_run(lambda: _grads(args, kw, seq, weights))
    assert any("mixer_scan_bwd7_kernel" in n for n in names), names
    assert not any("mixer_scan_bwd4_kernel" in n for n in names), names
    if segments not in ("1", "auto"):
        assert any("mixer_scan_bwd7_carry_kernel" in n for n in names), names
    _check_grads_repeatable(args, kw, weights, seq)


@gpu
@needs_kernel
@pytest.mark.parametrize("split", ["1", "3"])
def test_backward_v7_packed_equals_separate(split, monkeypatch):
    """The gradients of documents packed in one row match those of each document's separate call: the activations'
    rows (dzxbc, d dt_low) token by token, the parameters' as the sum over the documents. Not bitwise: the backward
    recomputes the states from the forward's per-tile checkpoints, which sit at other tokens in the two layouts, so
    the recomputed states may differ in the last bits. A document leak (a carry or conv tap across a start) would
    show as an O(1) error. The loss weights y only (the packed final states are the last document's)."""
    monkeypatch.setenv("APRIEL_SCAN_BWD", "v7")
    monkeypatch.setenv("APRIEL_SCAN_BWD_SEGMENTS", split)
    L = 300
    args, kw = make_inputs(1, L, 256, 64, dtype=torch.bfloat16, device="cuda", dt_rank=16, seed=43)
    cuts = [0, 37, 38, 128, 131, 200, L]
    seq = packed_seq_idx(1, L, cuts[1:-1], "cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    dy = torch.randn(1, L, 256, device="cuda", generator=gen).to(torch.bfloat16)

    def grads(inputs, seq_idx, dy_part):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
        mixer_scan(**leaves, **kw, seq_idx=seq_idx).backward(dy_part)
        return {k: v.grad for k, v in leaves.items()}

    packed = grads(args, seq, dy)
    parts = [grads({k: (v[:, a:b_] if k in ("zxbc", "dt_low") else v) for k, v in args.items()}, None, dy[:, a:b_])
             for a, b_ in zip(cuts[:-1], cuts[1:])]
    for name in args:
        if name in ("zxbc", "dt_low"):
            want = torch.cat([p[name] for p in parts], 1).double()
        else:
            want = sum(p[name].double() for p in parts)
        got = packed[name].double()
        scale = want.abs().max().item()
        assert scale > 0, f"d{name}: zero"
        assert err(got, want) <= 1e-2 * scale, f"d{name}: packed vs separate {err(got, want):.3e} (scale {scale:.3e})"


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=DT_IDS[:2])
@pytest.mark.parametrize("case", BWD7_CASES + [(2, 1000, 256, 64, True, 3, 8, "S5"), (2, 300, 256, 64, True, 4, 16, "S3_packed"),
                                                (1, 1000, 4096, 1024, True, 4, 16, "packed")],
                         ids=lambda c: f"b{c[0]}-L{c[1]}-D{c[2]}-X{c[3]}-{'rep' if c[4] else 'norep'}-W{c[5]}-R{c[6]}-{c[7] or 'plain'}")
def test_backward_v7_tma_staging_equals_cp_async(case, dtype, monkeypatch):
    """The v7 backward's TMA staging (16 boxes per tile: the forward's 11 slices, dy of 4 heads, the 4-row x halo
    whose rows before 0 read as zeros) gives bitwise the gradients of the cp.async staging - unsplit and split
    (tiles in reverse order, segment starts), tails, strided rows, initial states; the profiler shows the variant."""
    import apriel_kernels

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA staging needs sm_90")
    if not apriel_kernels.build_info().get("tma_staging"):
        pytest.skip("extension built without CUTLASS headers (pip install --no-deps nvidia-cutlass, then rebuild)")
    b, L, D_, X, repeat, width, rank, extra = case
    monkeypatch.setenv("APRIEL_SCAN_BWD", "v7")
    if extra.startswith("S"):
        monkeypatch.setenv("APRIEL_SCAN_BWD_SEGMENTS", extra[1])
    args, kw = make_inputs(b, L, D_, X, dtype=dtype, device="cuda", repeat=repeat, dt_rank=rank, width=width,
                           initial_states="init" in extra, strided=extra == "strided", seed=31)
    seq = packed_seq_idx(b, L, [L // 4, L // 2, L // 2 + 1, L - 2], "cuda") if "packed" in extra else None
    weights = _loss_weights(args, kw, dtype, seed=7)
    grads = {}
    for staging in ("0", "1"):
        monkeypatch.setenv("APRIEL_SCAN_TMA", staging)
        poison_allocator()
        names = _cuda_kernels_run(lambda staging=staging: grads.update({staging: _grads(args, kw, seq, weights)}))
        r = D_ // X  # <T, kTma, kSeq, kSpan, kMulti, kSubCk>: kSpan unless 4 or 1 per group, kMulti at 1
        span, multi = ("true" if r not in (1, 4) else "false"), ("true" if r == 1 else "false")
        tma, docs = ("true" if staging == "1" else "false"), ("true" if seq is not None else "false")
        want = f", {tma}, {docs}, {span}, {multi}, false>"
        assert any("mixer_scan_bwd7_kernel" in n and want in n for n in names), (staging, names)
    for name in grads["0"]:
        assert torch.equal(grads["0"][name], grads["1"][name]), f"d{name}: TMA staging differs from cp.async"
        assert torch.isfinite(grads["1"][name]).all(), name


@gpu
@needs_kernel
@pytest.mark.parametrize("used", ["final_states", "y"])
def test_backward_with_unused_outputs(used, bwd_version):
    """Outputs without a gradient reach the backward as None (no materialised zeros: the checkpoints' would be a
    fill of their size): the final states alone (dy None -> zeros) or y alone (no d final states)."""
    args, kw = make_inputs(2, 100, 256, 64, dtype=torch.bfloat16, device="cuda", dt_rank=16, initial_states=True,
                           seed=7)

    def grads(inputs, ref):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
        y, ssm, conv = (ref_mixer(leaves, kw, return_final_states=True) if ref
                        else mixer_scan(**leaves, **kw, return_final_states=True))
        loss = (ssm.double().square().sum() + conv.double().sum()) if used == "final_states" else y.double().sum()
        loss.backward()
        return {k: v.grad for k, v in leaves.items()}

    got, ref64, ref_lp = grads(args, False), grads(to64(args), True), grads(args, True)
    for name in args:
        if ref64[name] is None:  # the input does not reach the loss (D with the final states only): zeros
            assert got[name] is not None and not got[name].any(), f"d{name}: expected zeros"
            continue
        check(f"d{name}", got[name], ref64[name], ref_lp[name], k=3.0, floor=2e-3)


@gpu
@needs_kernel
def test_backward_default_dispatch(monkeypatch):
    """Default for 16-bit activations where v7 applies: v7 unsplit once batch x d_inner / 64 blocks fill the GPU
    (batch >= 4 at the model's shape on an H100), v7 with the sequence split below (the carry pre-pass runs); both
    with correct gradients."""
    monkeypatch.delenv("APRIEL_SCAN_BWD", raising=False)
    monkeypatch.delenv("APRIEL_SCAN_BWD_SEGMENTS", raising=False)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    D_, X = 4096, 1024
    big = 2 * sms // (D_ // 64)  # the largest batch whose grid fits one wave of 2 blocks per SM (4 on an H100)
    for b, split in ((1, True), (big, False)):
        args, kw = make_inputs(b, 200, D_, X, dtype=torch.bfloat16, device="cuda", dt_rank=16, seed=b)
        weights = _loss_weights(args, kw, torch.bfloat16, seed=b)
        names = _cuda_kernels_run(lambda args=args, kw=kw, weights=weights: _grads(args, kw, None, weights))
        assert any("mixer_scan_bwd7_kernel" in n for n in names), (b, names)
        assert not any("mixer_scan_bwd4_kernel" in n for n in names), (b, names)
        assert any("mixer_scan_bwd7_carry_kernel" in n for n in names) == split, (b, names)
        if b == 1:
            _check_grads(args, kw, None, torch.bfloat16)


@gpu
@needs_kernel
@pytest.mark.parametrize("heads_per_group,X,want_v7", [(3, 32, True), (6, 32, True), (7, 32, True), (5, 32, True),
                                                       (2, 32, True), (1, 64, True), (1, 32, False)])
def test_backward_default_with_partial_groups(heads_per_group, X, want_v7, monkeypatch):
    """Heads per group not a multiple of 4 (session 20, kSpan): the default backward is v7 from 2 heads per group on
    (scan_api.cpp bwd_v7_segments); one head per group (session 24, kMulti) where 4 divides the head count (X 64: 4
    heads), else v4 (X 32: 2 heads); the gradients are right either way."""
    monkeypatch.delenv("APRIEL_SCAN_BWD", raising=False)
    monkeypatch.delenv("APRIEL_SCAN_BWD_SEGMENTS", raising=False)
    args, kw = make_inputs(2, 70, heads_per_group * X, X, dtype=torch.bfloat16, device="cuda", dt_rank=16,
                           initial_states=True, seed=heads_per_group)
    weights = _loss_weights(args, kw, torch.bfloat16, seed=3)
    names = _cuda_kernels_run(lambda: _grads(args, kw, None, weights))
    assert any("mixer_scan_bwd7_kernel" in n for n in names) == want_v7, names
    assert any("mixer_scan_bwd4_kernel" in n for n in names) != want_v7, names
    _check_grads(args, kw, None, torch.bfloat16)


@gpu
@needs_kernel
@pytest.mark.parametrize("extra", ["fp32", "one_head_per_group"])
def test_backward_v7_falls_back_where_it_does_not_apply(extra, monkeypatch):
    # (misaligned rows: _grads clones its leaves - aligned again; the host check is the forward v7's plus dy's;
    # heads per group not a multiple of 4: v7 since session 19, BWD7_CASES; one head per group: v7 since session 24
    # where 4 divides the head count (kMulti), not here: 2 heads)
    monkeypatch.setenv("APRIEL_SCAN_BWD", "v7")
    dtype = torch.float32 if extra == "fp32" else torch.bfloat16
    D_, X = (32, 32) if extra == "one_head_per_group" else (64, 16)
    args, kw = make_inputs(2, 70, D_, X, dtype=dtype, device="cuda", dt_rank=16, initial_states=True, seed=3)
    seq = packed_seq_idx(2, 70, [20, 41], "cuda") if extra == "packed" else None
    weights = _loss_weights(args, kw, dtype, seed=4)
    names = _cuda_kernels_run(lambda: _grads(args, kw, seq, weights))
    assert not any("mixer_scan_bwd7_kernel" in n for n in names), names
    assert any("mixer_scan_bwd4_kernel" in n for n in names), names
    _check_grads(args, kw, seq, dtype)


@gpu
@needs_kernel
def test_opcheck_cuda():
    args, kw = make_inputs(2, 40, 64, 16, dtype=torch.bfloat16, device="cuda", initial_states=True)
    seq = packed_seq_idx(2, 40, [11], "cuda")
    pos = [args["zxbc"], args["dt_low"], args["conv_weight"], args["conv_bias"], args["dt_proj_weight"],
           args["dt_proj_bias"], args["A_log"], args["D"], args["initial_ssm_state"], args["initial_conv_state"], seq,
           kw["d_inner"], kw["d_xb"], kw["d_state"], True, True]
    torch.library.opcheck(mixer_scan_fwd, pos, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    dy = torch.randn(2, 40, 64, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(mixer_scan_bwd, pos[:15] + [dy, None, None, None], test_utils=("test_schema", "test_faketensor"))


@gpu
@needs_kernel
def test_compile_and_cuda_graph():
    args, kw = make_inputs(2, 129, 256, 64, dtype=torch.bfloat16, device="cuda", dt_rank=16)
    fresh, _ = make_inputs(2, 129, 256, 64, dtype=torch.bfloat16, device="cuda", dt_rank=16, seed=5)
    _assert_compile_and_graph_match_eager(args, kw, fresh["zxbc"])


@gpu
@needs_kernel
def test_cuda_rejects_unsupported_d_state():
    args, kw = make_inputs(1, 4, 64, 32, dtype=torch.float32, device="cuda")
    args["A_log"] = args["A_log"][:, :8].contiguous()
    with pytest.raises(ValueError, match="d_state"):
        mixer_scan(**{**args, "zxbc": torch.randn(1, 4, 2 * 64 + 2 * 32, device="cuda")}, d_inner=64, d_xb=32, d_state=8)
