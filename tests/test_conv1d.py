"""Causal conv1d: reference vs a naive loop, state continuity, packing, gradients, op contracts (CPU), and
the CUDA kernels vs the float64 reference (GPU, marked `gpu`).

GPU tolerance: max|kernel - ref64| <= 2 max|torch_lowprec - ref64| + floor, where torch_lowprec is the
reference run in the kernel's dtype (PyTorch's own rounding error) and floor = eps(dtype) * max|ref64|.
GPU outputs are NaN-poisoned: with deterministic mode and fill_uninitialized_memory, every torch.empty
(the C++ host file's included) returns NaNs, so an element a kernel fails to write fails the comparison.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import require_cuda_kernel

from apriel_kernels import causal_conv1d_fn, causal_conv1d_update
from apriel_kernels.conv1d import _conv_bwd_torch, causal_conv1d_bwd, causal_conv1d_fwd, causal_conv1d_update_op
from apriel_kernels.reference.conv1d import causal_conv1d_ref, causal_conv1d_update_ref

F64 = torch.float64
WIDTHS = [2, 3, 4]


# ---------------------------------------------------------------------------------------------- helpers
def naive_conv(x, weight, bias=None, seq_idx=None, init=None, silu=False):
    """Float64 loop over batch, token and tap (vectorised over channels only): the definition."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    halo = width - 1
    out = torch.zeros(batch, dim, seqlen, dtype=F64)
    final = torch.zeros(batch, dim, halo, dtype=F64)

    def value(b, pos):  # input at position pos (< 0: initial state) and its document id
        doc = int(seq_idx[b, max(pos, 0)]) if seq_idx is not None else 0
        if pos >= 0:
            return x[b, :, pos].double(), doc
        if init is not None:
            return init[b, :, halo + pos].double(), doc
        return torch.zeros(dim, dtype=F64), doc

    for b in range(batch):
        for t in range(seqlen):
            _, doc_t = value(b, t)
            acc = bias.double().clone() if bias is not None else torch.zeros(dim, dtype=F64)
            for k in range(width):
                v, doc = value(b, t - halo + k)
                if doc == doc_t:
                    acc += weight[:, k].double() * v
            out[b, :, t] = F.silu(acc) if silu else acc
        _, doc_last = value(b, seqlen - 1)
        for j in range(halo):
            v, doc = value(b, seqlen - halo + j)
            final[b, :, j] = v if doc == doc_last else 0.0
    return out, final


def random_seq_idx(batch, seqlen, docs, generator=None):
    """(batch, seqlen) int32 non-decreasing document ids with `docs` documents per row (random cuts)."""
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seqlen - 1, generator=generator)[: docs - 1] + 1 if seqlen > 1 else torch.tensor([])
        ids = torch.zeros(seqlen, dtype=torch.int32)
        for c in cuts.tolist():
            ids[int(c):] += 1
        rows.append(ids)
    return torch.stack(rows)


# ============================================================================================ CPU tests
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("seqlen", [1, 2, 7])
@pytest.mark.parametrize("features", ["plain", "bias_silu_init", "packed"])
def test_reference_matches_naive_loop(width, seqlen, features):
    batch, dim = 2, 5
    x = torch.randn(batch, dim, seqlen, dtype=F64)
    w = torch.randn(dim, width, dtype=F64)
    bias = torch.randn(dim, dtype=F64) if features != "plain" else None
    init = torch.randn(batch, dim, width - 1, dtype=F64) if features != "plain" else None
    seq_idx = random_seq_idx(batch, seqlen, 3) if features == "packed" and seqlen >= 3 else None
    silu = features != "plain"
    out, final = causal_conv1d_ref(x, w, bias, seq_idx, init, True, "silu" if silu else None)
    want_out, want_final = naive_conv(x, w, bias, seq_idx, init, silu)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, want_final, rtol=0, atol=0)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("state_len", [0, 2], ids=["state_len=W-1", "state_len=W+1"])
@pytest.mark.parametrize("q", [1, 3])
def test_update_reference_matches_naive_loop(width, state_len, q):
    batch, dim, slots = 3, 4, 5
    state_len = width - 1 + state_len
    state = torch.randn(slots, dim, state_len, dtype=F64)
    x = torch.randn(batch, dim, q, dtype=F64)
    w, bias = torch.randn(dim, width, dtype=F64), torch.randn(dim, dtype=F64)
    idx = torch.tensor([4, -1, 1], dtype=torch.int32)
    before = state.clone()
    out = causal_conv1d_update_ref(x, state, w, bias, "silu", idx)
    for row, slot in enumerate(idx.tolist()):
        if slot < 0:
            assert torch.equal(out[row], torch.zeros_like(out[row]))
            continue
        window = torch.cat([before[slot], x[row]], dim=1)  # (dim, S + q)
        for t in range(q):
            acc = bias + sum(w[:, k] * window[:, state_len - (width - 1) + k + t] for k in range(width))
            torch.testing.assert_close(out[row, :, t], F.silu(acc), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state[slot], window[:, q:], rtol=0, atol=0)
    untouched = [s for s in range(slots) if s not in idx.tolist()]
    assert torch.equal(state[untouched], before[untouched])


@pytest.mark.parametrize("width", WIDTHS)
def test_state_continuity(width):
    """fwd([a;b]) == fwd(a) then fwd(b, init=final(a)) == token-by-token update, through the public API."""
    batch, dim, la, lb = 2, 6, 5, 4
    x = torch.randn(batch, dim, la + lb, dtype=F64)
    w, bias = torch.randn(dim, width, dtype=F64), torch.randn(dim, dtype=F64)
    init = torch.randn(batch, dim, width - 1, dtype=F64)
    full, final_full = causal_conv1d_fn(x, w, bias, initial_states=init, return_final_states=True, activation="silu")
    out_a, final_a = causal_conv1d_fn(x[..., :la], w, bias, initial_states=init, return_final_states=True,
                                      activation="silu")
    out_b, final_b = causal_conv1d_fn(x[..., la:], w, bias, initial_states=final_a, return_final_states=True,
                                      activation="silu")
    torch.testing.assert_close(torch.cat([out_a, out_b], dim=2), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final_b, final_full, rtol=0, atol=0)
    state = init.clone()
    steps = [causal_conv1d_update(x[:, :, t], state, w, bias, "silu") for t in range(la + lb)]
    torch.testing.assert_close(torch.stack(steps, dim=2), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final_full, rtol=0, atol=0)


def test_packed_equals_separate():
    dim, width = 5, 4
    lengths = [3, 1, 6, 2]
    x = torch.randn(1, dim, sum(lengths), dtype=F64)
    w, bias = torch.randn(dim, width, dtype=F64), torch.randn(dim, dtype=F64)
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)]).unsqueeze(0)
    packed, final = causal_conv1d_fn(x, w, bias, seq_idx=seq_idx, return_final_states=True, activation="silu")
    start = 0
    for n in lengths:
        alone, alone_final = causal_conv1d_fn(x[..., start : start + n], w, bias, return_final_states=True,
                                              activation="silu")
        torch.testing.assert_close(packed[..., start : start + n], alone, rtol=1e-12, atol=1e-12)
        start += n
    torch.testing.assert_close(final, alone_final, rtol=0, atol=0)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("packed", [False, True], ids=["single", "packed"])
def test_gradcheck_float64(width, packed):
    batch, dim, seqlen = 2, 3, 6
    x = torch.randn(batch, dim, seqlen, dtype=F64, requires_grad=True)
    w = torch.randn(dim, width, dtype=F64, requires_grad=True)
    bias = torch.randn(dim, dtype=F64, requires_grad=True)
    init = torch.randn(batch, dim, width - 1, dtype=F64, requires_grad=True)
    seq_idx = random_seq_idx(batch, seqlen, 2) if packed else None

    def fn(x_, w_, b_, i_):
        out, final = causal_conv1d_fn(x_, w_, b_, seq_idx=seq_idx, initial_states=i_, return_final_states=True,
                                      activation="silu")
        return out, final

    assert torch.autograd.gradcheck(fn, (x, w, bias, init))


def _op_args(width=4, token_major=False, seqlen=7):
    batch, dim = 2, 8
    base = torch.randn(batch, seqlen, dim) if token_major else torch.randn(batch, dim, seqlen)
    x = base.transpose(1, 2) if token_major else base
    w, bias = torch.randn(dim, width), torch.randn(dim)
    init = torch.randn(batch, dim, width - 1)
    seq_idx = random_seq_idx(batch, seqlen, 2)
    return x, w, bias, seq_idx, init


@pytest.mark.parametrize("token_major", [False, True], ids=["channel_major", "token_major"])
def test_opcheck_cpu(token_major):
    x, w, bias, seq_idx, init = _op_args(token_major=token_major)
    torch.library.opcheck(causal_conv1d_fwd, (x, w, bias, seq_idx, init, True, True))
    torch.library.opcheck(causal_conv1d_fwd, (x, w, None, None, None, False, False))
    dout, dfinal = torch.randn_like(x), torch.randn_like(init)
    torch.library.opcheck(causal_conv1d_bwd, (x, w, bias, seq_idx, init, dout, dfinal, True))
    state = torch.randn(5, x.shape[1], 4)
    idx = torch.tensor([3, -1], dtype=torch.int32)
    torch.library.opcheck(causal_conv1d_update_op, (x[..., :2].contiguous(), state, w, bias, True, idx))


def test_output_layout_follows_input():
    x, w, bias, _, _ = _op_args(token_major=True)
    out = causal_conv1d_fn(x, w, bias, activation="silu")
    assert out.stride(1) == 1, "token-major x must give token-major out"
    x_cm, *_ = _op_args(token_major=False)
    assert causal_conv1d_fn(x_cm, w, bias).is_contiguous()


def test_torch_compile_fullgraph():
    # aot_eager: Dynamo must capture the whole call (fullgraph) and AOTAutograd must trace the fake
    # implementations; inductor's C++ codegen would only add minutes on the CPU machine.
    x, w, bias, seq_idx, init = _op_args(token_major=True)
    x = x.requires_grad_()

    def fwd(x_, w_, b_, i_):
        return causal_conv1d_fn(x_, w_, b_, seq_idx=seq_idx, initial_states=i_, return_final_states=True,
                                activation="silu")

    compiled = torch.compile(fwd, fullgraph=True, backend="aot_eager")
    out, final = compiled(x, w, bias, init)
    want, want_final = fwd(x, w, bias, init)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(final, want_final)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

    state = torch.randn(4, x.shape[1], 3)
    state_eager = state.clone()
    idx = torch.tensor([2, -1], dtype=torch.int32)
    step = torch.compile(causal_conv1d_update, fullgraph=True, backend="aot_eager")
    xs = torch.randn(2, x.shape[1])
    got = step(xs, state, w, bias, "silu", None, idx)
    torch.testing.assert_close(got, causal_conv1d_update(xs, state_eager, w, bias, "silu", None, idx))
    torch.testing.assert_close(state, state_eager)


def _bad_fn_calls():
    x = torch.randn(2, 8, 5)
    w, b = torch.randn(8, 4), torch.randn(8)
    return [
        ("x_dims", lambda: causal_conv1d_fn(x[0], w), "x"),
        ("x_dtype", lambda: causal_conv1d_fn(x.int(), w), "x"),
        ("x_layout", lambda: causal_conv1d_fn(x[:, ::2, ::2], w[::2]), "x"),
        ("weight_dim", lambda: causal_conv1d_fn(x, w[:4]), "weight"),
        ("weight_width", lambda: causal_conv1d_fn(x, torch.randn(8, 5)), "weight"),
        ("bias_shape", lambda: causal_conv1d_fn(x, w, b[:3]), "bias"),
        ("seq_idx_dtype", lambda: causal_conv1d_fn(x, w, seq_idx=torch.zeros(2, 5, dtype=torch.int64)), "seq_idx"),
        ("seq_idx_shape", lambda: causal_conv1d_fn(x, w, seq_idx=torch.zeros(2, 4, dtype=torch.int32)), "seq_idx"),
        ("init_shape", lambda: causal_conv1d_fn(x, w, initial_states=torch.randn(2, 8, 2)), "initial_states"),
        ("activation", lambda: causal_conv1d_fn(x, w, activation="relu"), "activation"),
        ("final_out_shape", lambda: causal_conv1d_fn(x, w, final_states_out=torch.randn(2, 8, 2)), "final_states_out"),
    ]


def _bad_update_calls():
    x = torch.randn(2, 8)
    w = torch.randn(8, 4)
    state = torch.randn(3, 8, 3)

    def idx(values):
        return torch.tensor(values, dtype=torch.int32)

    return [
        ("state_len", lambda: causal_conv1d_update(x, torch.randn(3, 8, 2), w), "conv_state"),
        ("state_dim", lambda: causal_conv1d_update(x, torch.randn(3, 7, 3), w), "conv_state"),
        ("slots", lambda: causal_conv1d_update(x, torch.randn(1, 8, 3), w), "conv_state"),
        ("idx_dtype", lambda: causal_conv1d_update(x, state, w, conv_state_indices=torch.zeros(2, dtype=torch.int64)),
         "conv_state_indices"),
        ("idx_range", lambda: causal_conv1d_update(x, state, w, conv_state_indices=idx([0, 3])), "conv_state_indices"),
        ("idx_below", lambda: causal_conv1d_update(x, state, w, conv_state_indices=idx([0, -2])), "conv_state_indices"),
        ("bias", lambda: causal_conv1d_update(x, state, w, torch.randn(4)), "bias"),
        ("weight", lambda: causal_conv1d_update(x, state, torch.randn(8, 1)), "weight"),
    ]


@pytest.mark.parametrize("case", _bad_fn_calls() + _bad_update_calls(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, call, name = case
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert re.match(rf"{name}[: ]", str(info.value)), str(info.value)


# ============================================================================================ GPU tests
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GPU_LENGTHS = [1, 2, 3, 63, 65, 2049, 4097]
# How x is laid out in memory: token-major contiguous and sliced from a wider row (both vectorised),
# token-major at an odd column offset (misaligned: generic kernel), odd dim, channel-major slice.
# Kernel variants of the vectorised forward/backward (APRIEL_CONV1D_FWD_IMPL / _BWD_IMPL): every one that
# stays selectable is tested; the grids above run the default.
# Session 3 variants: "deep", "wide" (both directions) and "deep_fused" = the deep forward with the
# backward-only "fused".
IMPLS = ["tile", "stream", "async", "deep", "wide", "deep_fused"]
_IMPL_ENV = {"deep_fused": ("deep", "fused")}


def use_impl(monkeypatch, impl):
    fwd, bwd = _IMPL_ENV.get(impl, (impl, impl))
    monkeypatch.setenv("APRIEL_CONV1D_FWD_IMPL", fwd)
    monkeypatch.setenv("APRIEL_CONV1D_BWD_IMPL", bwd)


LAYOUTS = ["tm", "tm_slice", "tm_misaligned", "tm_odd_dim", "cm_slice"]


@pytest.fixture
def poison():
    """Every uninitialised CUDA allocation is NaN-filled while the test runs."""
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(64, device="cuda").isnan().all(), "NaN poisoning of torch.empty is not active"
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def make_x(batch, dim, seqlen, dtype, layout):
    """(batch, dim, seqlen) CUDA tensor with the given memory layout; values ~ N(0, 1)."""
    if layout == "tm":
        return torch.randn(batch, seqlen, dim, device="cuda", dtype=dtype).transpose(1, 2)
    if layout == "tm_slice":
        return torch.randn(batch, seqlen, dim + 24, device="cuda", dtype=dtype)[:, :, 8 : 8 + dim].transpose(1, 2)
    if layout == "tm_misaligned":
        return torch.randn(batch, seqlen, dim + 5, device="cuda", dtype=dtype)[:, :, 3 : 3 + dim].transpose(1, 2)
    if layout == "tm_odd_dim":
        return torch.randn(batch, seqlen, dim - 3, device="cuda", dtype=dtype).transpose(1, 2)
    if layout == "cm_slice":
        return torch.randn(batch, dim, seqlen + 5, device="cuda", dtype=dtype)[:, :, 2 : 2 + seqlen]
    raise ValueError(layout)


def eps_of(dtype):
    return {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-20, F64: 1e-12}[dtype]


def assert_close_to_ref(name, got, ref64, lowprec):
    """max|got - ref64| <= 2 max|lowprec - ref64| + eps(dtype) * max(1, max|ref64|); NaNs fail."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    got64 = got.double()
    assert torch.isfinite(got64).all(), f"{name}: non-finite values (unwritten output?)"
    err = (got64 - ref64).abs().max().item() if got.numel() else 0.0
    low_err = (lowprec.double() - ref64).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item() if got.numel() else 0.0)
    bound = 2 * low_err + eps_of(lowprec.dtype) * scale
    assert err <= bound, f"{name}: max err {err:.3e} > bound {bound:.3e} (torch {got.dtype} err {low_err:.3e})"


def assert_layout_follows(name, out, x):
    """out is token-major contiguous when x is token-major (stride(1) == 1, dim > 1), else contiguous."""
    token_major = x.stride(1) == 1 and x.shape[1] > 1
    dense = out.transpose(1, 2).is_contiguous() if token_major else out.is_contiguous()
    assert dense, f"{name}: strides {out.stride()} do not follow x's layout (strides {x.stride()})"


def conv_case(dtype, width, seqlen, layout, features, batch=2, dim=328):
    x = make_x(batch, dim, seqlen, dtype, layout)
    dim = x.shape[1]
    w = torch.randn(dim, width, device="cuda", dtype=dtype) * 0.5
    full = features in ("full", "packed")
    bias = torch.randn(dim, device="cuda", dtype=dtype) if full else None
    init = torch.randn(batch, dim, width - 1, device="cuda", dtype=dtype) if full else None
    seq_idx = random_seq_idx(batch, seqlen, 4).cuda() if features == "packed" and seqlen >= 4 else None
    return x, w, bias, seq_idx, init, full


def dout_like(x, dim, layout):
    """An output gradient with x's layout (a fresh strided buffer, so the backward sees strided dout too)."""
    return make_x(x.shape[0], dim, x.shape[2], x.dtype, layout)


def ref_fwd(x, w, bias, seq_idx, init, silu, dtype):
    cast = (lambda t: None if t is None else t.to(dtype))
    return causal_conv1d_ref(cast(x), cast(w), cast(bias), seq_idx, cast(init), True, "silu" if silu else None)


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_fwd")
@pytest.mark.parametrize("features", ["plain", "full", "packed"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seqlen", GPU_LENGTHS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_cuda_fwd_matches_reference(dtype, width, seqlen, layout, features, poison):
    x, w, bias, seq_idx, init, silu = conv_case(dtype, width, seqlen, layout, features)
    out, final = causal_conv1d_fwd(x, w, bias, seq_idx, init, True, silu)
    ref_out, ref_final = ref_fwd(x, w, bias, seq_idx, init, silu, F64)
    low_out, _ = ref_fwd(x, w, bias, seq_idx, init, silu, dtype)
    assert_close_to_ref("out", out, ref_out, low_out)
    # The final state is a copy of inputs: exact.
    assert torch.equal(final.double(), ref_final), "final_states differ from the reference"
    assert_layout_follows("out", out, x)


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_bwd")
@pytest.mark.parametrize("features", ["plain", "full", "packed"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seqlen", [1, 3, 65, 2049])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_cuda_bwd_matches_reference(dtype, width, seqlen, layout, features, poison):
    check_bwd(dtype, width, seqlen, layout, features)


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_bwd")
@pytest.mark.parametrize("features", ["plain", "full", "packed"])
@pytest.mark.parametrize("seqlen", [3, 65, 2049])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_cuda_bwd_vector_weight_loads(dtype, width, seqlen, features, monkeypatch, poison):
    """The vector weight/bias loads (APRIEL_CONV1D_VEC_WEIGHTS=1, also the default) of the vectorised backward."""
    monkeypatch.setenv("APRIEL_CONV1D_VEC_WEIGHTS", "1")
    check_bwd(dtype, width, seqlen, "tm", features)


def check_bwd(dtype, width, seqlen, layout, features):
    x, w, bias, seq_idx, init, silu = conv_case(dtype, width, seqlen, layout, features)
    dout = dout_like(x, 328, layout)
    dfinal = torch.randn(x.shape[0], x.shape[1], width - 1, device="cuda", dtype=dtype) if init is not None else None
    dx, dw, db, dinit = causal_conv1d_bwd(x, w, bias, seq_idx, init, dout, dfinal, silu)

    def grads(precision):
        leaves = [t.detach().to(precision).requires_grad_() if t is not None else None for t in (x, w, bias, init)]
        out, final = causal_conv1d_ref(leaves[0], leaves[1], leaves[2], seq_idx, leaves[3], True,
                                       "silu" if silu else None)
        loss = (out * dout.to(precision)).sum()
        if dfinal is not None:
            loss = loss + (final * dfinal.to(precision)).sum()
        live = [t for t in leaves if t is not None]
        got = iter(torch.autograd.grad(loss, live))
        return [next(got) if t is not None else None for t in leaves]

    ref, low = grads(F64), grads(dtype)
    assert_close_to_ref("dx", dx, ref[0], low[0])
    assert_layout_follows("dx", dx, x)
    assert dw.dtype == torch.float32
    assert_close_to_ref("dweight", dw, ref[1], low[1])
    if bias is not None:
        assert_close_to_ref("dbias", db, ref[2], low[2])
    else:
        assert db.numel() == 0
    if init is not None:
        assert_close_to_ref("dinitial_states", dinit, ref[3], low[3])
    else:
        assert dinit.numel() == 0


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_bwd")
def test_cuda_autograd_through_public_api(poison):
    x, w, bias, seq_idx, init, _ = conv_case(torch.bfloat16, 4, 257, "tm", "packed")
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, bias, init)]
    out, final = causal_conv1d_fn(leaves[0], leaves[1], leaves[2], seq_idx=seq_idx, initial_states=leaves[3],
                                  return_final_states=True, activation="silu")
    (out.float().square().sum() + final.float().sum()).backward()
    for name, t in zip(("x", "weight", "bias", "initial_states"), leaves):
        assert t.grad is not None and t.grad.dtype == t.dtype and torch.isfinite(t.grad).all(), name


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_bwd")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["tm", "cm_slice"])
def test_cuda_bwd_deterministic(layout, impl, monkeypatch):
    use_impl(monkeypatch, impl)
    x, w, bias, seq_idx, init, _ = conv_case(torch.bfloat16, 4, 4097, layout, "full", batch=2, dim=1024)
    dout = torch.randn_like(x)
    first = causal_conv1d_bwd(x, w, bias, seq_idx, init, dout, None, True)
    for _ in range(3):
        again = causal_conv1d_bwd(x, w, bias, seq_idx, init, dout, None, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "backward is not bitwise reproducible"


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_update")
@pytest.mark.parametrize("state_dtype", ["same", "fp32"])
@pytest.mark.parametrize("state_extra", [0, 3], ids=["state_len=W-1", "state_len=W+2"])
@pytest.mark.parametrize("q", [1, 4])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_cuda_update_matches_reference(dtype, width, q, state_extra, state_dtype, poison):
    batch, dim, slots = 5, 200, 9
    sdt = dtype if state_dtype == "same" else torch.float32
    state = torch.randn(slots, dim, width - 1 + state_extra, device="cuda", dtype=sdt)
    # Strided x: a column slice of a wider token-major buffer.
    x = torch.randn(batch, q, dim + 8, device="cuda", dtype=dtype)[:, :, 4 : 4 + dim].transpose(1, 2)
    w = torch.randn(dim, width, device="cuda", dtype=dtype) * 0.5
    bias = torch.randn(dim, device="cuda", dtype=dtype)
    idx = torch.tensor([7, -1, 2, 0, -1], device="cuda", dtype=torch.int32)  # permuted, padded
    ref_state, low_state = state.clone(), state.clone()
    got = causal_conv1d_update(x, state, w, bias, "silu", conv_state_indices=idx)
    ref64_state = ref_state.double()
    ref = causal_conv1d_update_ref(x.double(), ref64_state, w.double(), bias.double(), "silu", idx)
    low = causal_conv1d_update_ref(x, low_state, w, bias, "silu", idx)
    assert_close_to_ref("out", got, ref, low)
    assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.equal(got[4], torch.zeros_like(got[4]))
    assert torch.equal(state, low_state), "conv_state must equal the reference's (a shift of stored values)"


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_update")
def test_cuda_update_continues_fwd():
    """Prefill with final states, then token-by-token updates == one forward over everything."""
    dtype, width, dim = torch.float32, 4, 64
    x = make_x(2, dim, 40, dtype, "tm")
    w, bias = torch.randn(dim, width, device="cuda", dtype=dtype), torch.randn(dim, device="cuda", dtype=dtype)
    full = causal_conv1d_fn(x, w, bias, activation="silu")
    out_a, state = causal_conv1d_fn(x[..., :30], w, bias, return_final_states=True, activation="silu")
    steps = [causal_conv1d_update(x[:, :, t], state, w, bias, "silu") for t in range(30, 40)]
    torch.testing.assert_close(torch.cat([out_a, torch.stack(steps, 2)], 2), full, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_fwd")
@pytest.mark.parametrize("layout", ["tm", "tm_misaligned", "cm_slice"])
def test_cuda_opcheck(layout):
    x, w, bias, seq_idx, init, _ = conv_case(torch.bfloat16, 4, 33, layout, "packed", dim=64)
    torch.library.opcheck(causal_conv1d_fwd, (x, w, bias, seq_idx, init, True, True))
    torch.library.opcheck(causal_conv1d_fwd, (x, w, None, None, None, False, False))
    dout, dfinal = torch.randn_like(x), torch.randn_like(init)
    torch.library.opcheck(causal_conv1d_bwd, (x, w, bias, seq_idx, init, dout, dfinal, True))
    state = torch.randn(5, x.shape[1], 4, device="cuda", dtype=torch.bfloat16)
    idx = torch.tensor([3, -1], device="cuda", dtype=torch.int32)
    torch.library.opcheck(causal_conv1d_update_op, (x[..., :2], state, w, bias, True, idx))


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_bwd")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["tm", "tm_misaligned", "cm_slice"])
def test_cuda_float64_matches_reference(layout, impl, monkeypatch, poison):
    """float64 on CUDA runs the same kernels in double: agreement to ~1e-12 (both vectorised variants)."""
    use_impl(monkeypatch, impl)
    x, w, bias, seq_idx, init, _ = conv_case(F64, 3, 130, layout, "packed", dim=64)
    dout, dfinal = dout_like(x, 64, layout), torch.randn_like(init)
    out, final = causal_conv1d_fwd(x, w, bias, seq_idx, init, True, True)
    ref_out, ref_final = ref_fwd(x, w, bias, seq_idx, init, True, F64)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert torch.equal(final, ref_final)
    dx, dw, db, dinit = causal_conv1d_bwd(x, w, bias, seq_idx, init, dout, dfinal, True)
    want = _conv_bwd_torch(x, w, bias, seq_idx, init, dout, dfinal, True)
    torch.testing.assert_close(dx, want[0], rtol=1e-12, atol=1e-12)
    # dweight/dbias are fp32 by contract: per-block partials are stored and summed in fp32 (up to
    # batch * splits of them), so allow fp32 accumulation error relative to the largest entry.
    for name, got, ref in (("dweight", dw, want[1]), ("dbias", db, want[2])):
        tol = 2e-5 * max(1.0, ref.abs().max().item())
        assert (got.double() - ref).abs().max().item() <= tol, name
    torch.testing.assert_close(dinit, want[3], rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("vector_weights", ["0", "1"])
@pytest.mark.parametrize("tokens", ["4", "8"])
@pytest.mark.parametrize("features", ["plain", "full", "packed"])
@pytest.mark.parametrize("seqlen", [1, 65, 4097])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@require_cuda_kernel("causal_conv1d_fwd")
def test_cuda_fwd_tilings_and_weight_loads(dtype, width, seqlen, features, tokens, vector_weights, monkeypatch,
                                           poison):
    """Both token tilings of the vectorised forward (8 is the default, APRIEL_CONV1D_FWD_TOKENS=4 the
    other) and both weight loads (scalar default, APRIEL_CONV1D_VEC_WEIGHTS=1 vectors)."""
    monkeypatch.setenv("APRIEL_CONV1D_FWD_TOKENS", tokens)
    monkeypatch.setenv("APRIEL_CONV1D_VEC_WEIGHTS", vector_weights)
    x, w, bias, seq_idx, init, silu = conv_case(dtype, width, seqlen, "tm_slice", features)
    out, final = causal_conv1d_fwd(x, w, bias, seq_idx, init, True, silu)
    ref_out, ref_final = ref_fwd(x, w, bias, seq_idx, init, silu, F64)
    low_out, _ = ref_fwd(x, w, bias, seq_idx, init, silu, dtype)
    assert_close_to_ref("out", out, ref_out, low_out)
    assert torch.equal(final.double(), ref_final)


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_bwd")
@pytest.mark.parametrize("features", ["plain", "full", "packed"])
@pytest.mark.parametrize("seqlen", [1, 65, 4097])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_impls_match_reference(impl, dtype, width, seqlen, features, monkeypatch, poison):
    """Forward and backward of each vectorised variant. With dim 328 and batch 2 the stream kernels split
    4097 tokens into ~257 runs of 16 (the last of 1 token, shorter than the halo) and 3 channel blocks, the
    last mostly idle: run boundaries, documents crossing them, the initial state, dfinal and dinit. Rows
    sliced out of a wider buffer (tm_slice): strided, still 16-byte aligned, so the vectorised kernels run.
    243 cases; the default's full layout grid is the tests above."""
    layout = "tm_slice"
    use_impl(monkeypatch, impl)
    x, w, bias, seq_idx, init, silu = conv_case(dtype, width, seqlen, layout, features)
    out, final = causal_conv1d_fwd(x, w, bias, seq_idx, init, True, silu)
    ref_out, ref_final = ref_fwd(x, w, bias, seq_idx, init, silu, F64)
    low_out, _ = ref_fwd(x, w, bias, seq_idx, init, silu, dtype)
    assert_close_to_ref("out", out, ref_out, low_out)
    assert torch.equal(final.double(), ref_final), "final_states differ from the reference"
    check_bwd(dtype, width, seqlen, layout, features)


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_bwd")
@pytest.mark.parametrize("shape", [(1, 8192, 1024), (3, 1000, 4096)], ids=["b1_L8192_C1024", "b3_L1000_C4096"])
def test_cuda_stream_matches_tile_at_bench_shapes(shape, monkeypatch):
    """The two variants agree at benchmark-like shapes (many runs per channel block; bf16 + silu). out and
    dx are the same per-element fp32 expressions (within one bf16 rounding step, in case the compiler
    contracts differently), the final state is a copy (bitwise); dweight/dbias differ only by the fp32
    summation order."""
    batch, seqlen, dim = shape
    x = torch.randn(batch, seqlen, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    w = torch.randn(dim, 4, device="cuda", dtype=torch.bfloat16) * 0.5
    b = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(x)
    results = {}
    for impl in IMPLS:
        use_impl(monkeypatch, impl)
        out, final = causal_conv1d_fwd(x, w, b, None, None, True, True)
        results[impl] = (out, final, *causal_conv1d_bwd(x, w, b, None, None, dout, None, True))
    tile = results["tile"]
    for impl in IMPLS[1:]:
        other = results[impl]
        assert torch.equal(tile[1], other[1]), f"final_states: {impl} and tile kernels differ"
        for name, i in (("out", 0), ("dx", 2)):
            a, s = tile[i].float(), other[i].float()
            assert torch.isfinite(s).all(), f"{name}: non-finite values from the {impl} kernel"
            assert ((a - s).abs() <= 2**-7 * a.abs() + 1e-6).all(), f"{name}: {impl} and tile kernels differ"
        for name, i in (("dweight", 3), ("dbias", 4)):
            torch.testing.assert_close(other[i], tile[i], rtol=1e-4, atol=1e-3 * tile[i].abs().max().item())


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_bwd")
@pytest.mark.parametrize("impl", ["deep", "fused", "wide"])
def test_cuda_bwd_fused_fallback_beyond_one_wave(impl, monkeypatch, poison):
    """A grid larger than one wave of resident blocks (batch 64 x 8 (wide: 2) channel blocks > 3 x 132):
    "fused" and "wide" cannot launch cooperatively and take their unfused kernel + the reduction kernel;
    all must still agree with the async kernel (dweight/dbias up to the fp32 summation order)."""
    monkeypatch.setenv("APRIEL_CONV1D_BWD_IMPL", impl)
    x, w, bias, seq_idx, init, silu = conv_case(torch.bfloat16, 4, 40, "tm", "full", batch=64, dim=1024)
    dout = dout_like(x, 1024, "tm")
    got = causal_conv1d_bwd(x, w, bias, seq_idx, init, dout, None, silu)
    monkeypatch.setenv("APRIEL_CONV1D_BWD_IMPL", "async")
    want = causal_conv1d_bwd(x, w, bias, seq_idx, init, dout, None, silu)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2**-7, atol=1e-6)
    for name, a, b in (("dweight", got[1], want[1]), ("dbias", got[2], want[2])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * b.abs().max().item(), msg=name)


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_bwd")
def test_cuda_bwd_fused_equals_deep_bitwise(monkeypatch):
    """fused = deep + the reduction moved into the kernel, in the same row order: bitwise equal results at a
    shape where the cooperative launch is taken (b1 L8192 C4096 plans exactly one wave)."""
    x = torch.randn(1, 8192, 4096, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    w = torch.randn(4096, 4, device="cuda", dtype=torch.bfloat16) * 0.5
    b = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(x)
    results = []
    for impl in ("deep", "fused"):
        monkeypatch.setenv("APRIEL_CONV1D_BWD_IMPL", impl)
        results.append(causal_conv1d_bwd(x, w, b, None, None, dout, None, True))
    for name, a, c in zip(("dx", "dweight", "dbias"), results[0], results[1]):
        assert torch.equal(a, c), f"{name}: fused and deep differ"


# Channel-major forward (APRIEL_CONV1D_CM_IMPL=vec): x (batch, dim, seqlen) with unit token stride.
# "cm" contiguous; "cm_pad8" rows padded by 8 tokens (strided, still 16-byte aligned); lengths that are
# multiples of 8 take the vector kernel (65 falls back to the generic kernel); 4104 tokens
# spans two 4096-token bf16 tiles with a partial one; documents cross vector and tile boundaries.
CM_LENGTHS = [8, 24, 4104, 65]


def make_cm(batch, dim, seqlen, dtype, layout):
    if layout == "cm":
        return torch.randn(batch, dim, seqlen, device="cuda", dtype=dtype)
    return torch.randn(batch, dim, seqlen + 8, device="cuda", dtype=dtype)[:, :, :seqlen]


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_fwd")
@pytest.mark.parametrize("features", ["plain", "full", "packed"])
@pytest.mark.parametrize("layout", ["cm", "cm_pad8"])
@pytest.mark.parametrize("seqlen", CM_LENGTHS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_cuda_fwd_channel_major_vec(dtype, width, seqlen, layout, features, monkeypatch, poison):
    monkeypatch.setenv("APRIEL_CONV1D_CM_IMPL", "vec")
    batch, dim = 2, 40
    x = make_cm(batch, dim, seqlen, dtype, layout)
    w = torch.randn(dim, width, device="cuda", dtype=dtype) * 0.5
    full = features in ("full", "packed")
    bias = torch.randn(dim, device="cuda", dtype=dtype) if full else None
    init = torch.randn(batch, dim, width - 1, device="cuda", dtype=dtype) if full else None
    seq_idx = random_seq_idx(batch, seqlen, 5).cuda() if features == "packed" else None
    out, final = causal_conv1d_fwd(x, w, bias, seq_idx, init, True, full)
    ref_out, ref_final = ref_fwd(x, w, bias, seq_idx, init, full, F64)
    low_out, _ = ref_fwd(x, w, bias, seq_idx, init, full, dtype)
    assert_close_to_ref("out", out, ref_out, low_out)
    assert_layout_follows("out", out, x)
    assert torch.equal(final.double(), ref_final), "final_states differ from the reference"


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_bwd")
@pytest.mark.parametrize("features", ["plain", "full", "packed"])
@pytest.mark.parametrize("layout", ["cm", "cm_pad8"])
@pytest.mark.parametrize("seqlen", CM_LENGTHS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_cuda_bwd_channel_major_vec(dtype, width, seqlen, layout, features, monkeypatch, poison):
    """The channel-major vector backward (x, dout, dx with unit token stride) against float64 autograd
    through the reference: dx, dweight, dbias, dinitial_states with dfinal_states, documents crossing
    vector and tile boundaries."""
    monkeypatch.setenv("APRIEL_CONV1D_CM_IMPL", "vec")
    batch, dim = 2, 40
    x = make_cm(batch, dim, seqlen, dtype, layout)
    dout = make_cm(batch, dim, seqlen, dtype, layout)
    w = torch.randn(dim, width, device="cuda", dtype=dtype) * 0.5
    full = features in ("full", "packed")
    bias = torch.randn(dim, device="cuda", dtype=dtype) if full else None
    init = torch.randn(batch, dim, width - 1, device="cuda", dtype=dtype) if full else None
    dfinal = torch.randn(batch, dim, width - 1, device="cuda", dtype=dtype) if full else None
    seq_idx = random_seq_idx(batch, seqlen, 5).cuda() if features == "packed" else None
    dx, dw, db, dinit = causal_conv1d_bwd(x, w, bias, seq_idx, init, dout, dfinal, full)

    def grads(precision):
        leaves = [t.detach().to(precision).requires_grad_() if t is not None else None for t in (x, w, bias, init)]
        out, final = causal_conv1d_ref(leaves[0], leaves[1], leaves[2], seq_idx, leaves[3], True,
                                       "silu" if full else None)
        loss = (out * dout.to(precision)).sum()
        if dfinal is not None:
            loss = loss + (final * dfinal.to(precision)).sum()
        got = iter(torch.autograd.grad(loss, [t for t in leaves if t is not None]))
        return [next(got) if t is not None else None for t in leaves]

    ref, low = grads(F64), grads(dtype)
    assert_close_to_ref("dx", dx, ref[0], low[0])
    assert_layout_follows("dx", dx, x)
    assert_close_to_ref("dweight", dw, ref[1], low[1])
    if full:
        assert_close_to_ref("dbias", db, ref[2], low[2])
        assert_close_to_ref("dinitial_states", dinit, ref[3], low[3])


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_bwd")
def test_cuda_bwd_channel_major_vec_deterministic(monkeypatch):
    monkeypatch.setenv("APRIEL_CONV1D_CM_IMPL", "vec")
    x = torch.randn(2, 256, 8200, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 4, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(x)
    first = causal_conv1d_bwd(x, w, b, None, None, dout, None, True)
    again = causal_conv1d_bwd(x, w, b, None, None, dout, None, True)
    for a, c in zip(first, again):
        assert torch.equal(a, c), "channel-major vector backward is not bitwise reproducible"


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_fwd")
def test_cuda_fwd_channel_major_vec_matches_generic(monkeypatch):
    """At the benchmark shape the vector kernel and the generic kernel compute the same fp32 expression per
    element: equal within one bf16 rounding step; the final state is a copy (bitwise)."""
    x = torch.randn(1, 4096, 8192, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4, device="cuda", dtype=torch.bfloat16) * 0.5
    b = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    results = {}
    for impl in ("generic", "vec"):
        monkeypatch.setenv("APRIEL_CONV1D_CM_IMPL", impl)
        results[impl] = causal_conv1d_fwd(x, w, b, None, None, True, True)
    (a, fa), (v, fv) = results["generic"], results["vec"]
    assert torch.equal(fa, fv)
    a, v = a.float(), v.float()
    assert torch.isfinite(v).all()
    assert ((a - v).abs() <= 2**-7 * a.abs() + 1e-6).all(), "vec and generic channel-major kernels differ"


_RAW_OP_ERRORS = textwrap.dedent("""
    import torch
    from apriel_kernels._ext import load_error
    assert load_error() is None, load_error()  # loads apriel_kernels._C, registering torch.ops.apriel_C
    x = torch.randn(2, 9, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    w = torch.randn(64, 4, device="cuda", dtype=torch.bfloat16)
    kernel = torch.ops.apriel_C.causal_conv1d_fwd
    cases = [
        ("weight: expected width", (x, torch.randn(64, 5, device="cuda"), None, None, None, False, True)),
        ("seq_idx: expected dtype int32",
         (x, w, None, torch.zeros(2, 9, device="cuda", dtype=torch.int64), None, False, True)),
        ("bias: expected a CUDA tensor", (x, w, torch.randn(64), None, None, False, True)),
    ]
    for expected, args in cases:
        try:
            kernel(*args)
        except RuntimeError as error:
            assert expected in str(error), (expected, str(error)[:300])
        else:
            raise AssertionError("no error for " + expected)
    print("ok")
""")


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_fwd")
def test_cuda_raw_op_errors_name_the_argument():
    """The C++ checks of torch.ops.apriel_C.* (reached only by callers that skip the Python layer).

    Run in a subprocess so that a crash fails this test instead of ending the session. Until session 4 a
    TORCH_CHECK segfaulted on the GPU machine: its compiler links a static libstdc++ unless told otherwise
    (setup.py `_shared_libstdcxx_link_args`; scripts/diag/torch_check_throw.sh shows both builds).
    """
    done = subprocess.run([sys.executable, "-c", _RAW_OP_ERRORS], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        f"exit {done.returncode}: {done.stderr[-2000:]}"
    )


@pytest.mark.gpu
@require_cuda_kernel("causal_conv1d_update")
def test_cuda_update_graph_capture_replay():
    """causal_conv1d_update is CUDA-graph capturable (decode engines replay it) and replays equal eager steps."""
    batch, dim, width, slots = 4, 128, 4, 6
    w = torch.randn(dim, width, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    idx = torch.tensor([5, -1, 0, 3], device="cuda", dtype=torch.int32)
    state = torch.randn(slots, dim, width - 1, device="cuda", dtype=torch.float32)
    state_eager = state.clone()
    x_static = torch.randn(batch, dim, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, then undo its state change
        causal_conv1d_update(x_static, state.clone(), w, bias, "silu", conv_state_indices=idx)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = causal_conv1d_update(x_static, state, w, bias, "silu", conv_state_indices=idx)
    for _ in range(3):
        x = torch.randn(batch, dim, device="cuda", dtype=torch.bfloat16)
        x_static.copy_(x)
        graph.replay()
        want = causal_conv1d_update(x, state_eager, w, bias, "silu", conv_state_indices=idx)
        assert torch.equal(out_static, want)
        assert torch.equal(state, state_eager)
