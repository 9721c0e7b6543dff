"""The fused decode step apriel::mixer_step (issue 4).

CPU: the reference semantics (scan continuity, q tokens == q single steps, slot permutation/padding,
conv-cache layouts, out= form), opcheck, torch.compile without cache copies, bad-input errors.
GPU (marked gpu, skipped without the kernel): the CUDA kernel against the float64 reference across
activation / state dtypes and cache layouts, 2,000-step drift, prefill (mixer_scan) + steps == whole scan,
slots, q tokens, CUDA-graph replay, opcheck. The kernel tests run the default kernel (v2) and, where
marked with the `variant` fixture, also v1 (APRIEL_STEP_KERNEL=v1, kept for A/B benchmarks) and v3
(APRIEL_STEP_KERNEL=v3: TMA-staged state, q = 1 with 16-bit activations; other cases of the matrix run v2).

Tolerances (GPU): |kernel - ref64| <= 2 |torch fp32 reference - ref64| + one unit of the output dtype,
i.e. the kernel may not be worse than PyTorch computing the same thing in fp32.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch

from apriel_kernels import mixer_scan, mixer_step
from apriel_kernels.mixer_step import mixer_step_op, mixer_step_out_op
from apriel_kernels.reference.mixer import mixer_scan_ref, mixer_step_ref
from conftest import require_cuda_kernel

SMALL = dict(d_inner=128, d_xb=32, d_state=16)  # r = 4 like Apriel-H1, 2 x/B groups
H1 = dict(d_inner=4096, d_xb=1024, d_state=16)
needs_kernel = require_cuda_kernel("mixer_step")
# One unit in the last place of each output dtype, relative to the output's scale.
ULP = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10, torch.float64: 1e-12}


# ---------------------------------------------------------------------------------------------- helpers
@dataclass
class Layer:
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    dt_proj_weight: torch.Tensor
    dt_proj_bias: torch.Tensor
    A_log: torch.Tensor
    D: torch.Tensor

    def params(self):
        return (self.conv_weight, self.conv_bias, self.dt_proj_weight, self.dt_proj_bias, self.A_log, self.D)

    def to(self, device=None, dtype=None):
        """Weights to `dtype` (A_log / D stay fp32 unless dtype is float64)."""
        def cast(t, keep_fp32=False):
            if t is None:
                return None
            want = dtype if dtype is not None and (not keep_fp32 or dtype == torch.float64) else t.dtype
            return t.to(device=device, dtype=want)

        return Layer(cast(self.conv_weight), cast(self.conv_bias), cast(self.dt_proj_weight), cast(self.dt_proj_bias),
                     cast(self.A_log, True), cast(self.D, True))


def make_layer(d_inner, d_xb, d_state, dt_rank=16, width=4, repeat=True, conv_bias=True) -> Layer:
    """Random fp32 mixer parameters with live dynamics: delta = softplus(W dt + 2 b) spans ~0.02..3."""
    cc = d_inner if repeat else d_xb
    a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(d_inner, d_state)
    return Layer(
        conv_weight=torch.randn(cc, width) * 0.5,
        conv_bias=torch.randn(cc) * 0.2 if conv_bias else None,
        dt_proj_weight=(torch.rand(d_inner, dt_rank) * 2 - 1) * dt_rank**-0.5,
        dt_proj_bias=torch.rand(d_inner) * 2.5 - 2.0,
        A_log=(a_log + 0.2 * torch.randn(d_inner, d_state)).contiguous(),
        D=torch.randn(d_inner),
    )


def make_inputs(batch, q, d_inner, d_xb, dt_rank=16, dtype=torch.float32, device="cpu", strided=False):
    """zxbc (b, q, 2D+2X) and dt_low (b, q, R); strided=True slices them out of wider buffers."""
    width = 2 * d_inner + 2 * d_xb
    if strided:
        zxbc = torch.randn(batch, q, width + 24, dtype=dtype, device=device)[..., 8 : 8 + width]
        dt_low = torch.randn(batch, q, dt_rank + 5, dtype=dtype, device=device)[..., 3 : 3 + dt_rank]
    else:
        zxbc = torch.randn(batch, q, width, dtype=dtype, device=device)
        dt_low = torch.randn(batch, q, dt_rank, dtype=dtype, device=device)
    return zxbc, dt_low


def make_caches(slots, d_inner, d_xb, d_state, conv_channels, state_len, act_dtype, state_dtype, device="cpu"):
    conv = torch.randn(slots, conv_channels, state_len, device=device).to(act_dtype)
    ssm = (0.5 * torch.randn(slots, d_inner // d_state, d_state, d_state, device=device)).to(state_dtype)
    return conv, ssm


def _set_rows_per_warp(monkeypatch, spw):
    """Forces v3's rows per warp (APRIEL_STEP_V3_SEQ = spw), or leaves the launcher's choice for spw None."""
    if spw is None:
        monkeypatch.delenv("APRIEL_STEP_V3_SEQ", raising=False)
    else:
        monkeypatch.setenv("APRIEL_STEP_V3_SEQ", spw)


def run_step(zxbc, dt_low, conv, ssm, slot_idx, layer, dims, repeat=True, out=None):
    return mixer_step(zxbc, dt_low, conv, ssm, slot_idx, *layer.params(), **dims, repeat_kv_before_conv=repeat, out=out)


def run_ref(zxbc, dt_low, conv, ssm, slot_idx, layer, dims, repeat=True):
    return mixer_step_ref(zxbc, dt_low, conv, ssm, slot_idx, *layer.params(), **dims, repeat_kv_before_conv=repeat)


def as64(*tensors):
    return tuple(t.double() if t is not None else None for t in tensors)


def assert_close_to_ref(name, got, ref64, ref32, out_dtype):
    """|got - ref64| <= 2 |ref32 - ref64| + 1 ulp(out_dtype) * scale (max norms)."""
    assert not torch.isnan(got).any(), f"{name}: NaN in the output (an unwritten element?)"
    err = (got.double() - ref64).abs().max().item()
    base = (ref32.double() - ref64).abs().max().item()
    scale = max(ref64.abs().max().item(), 1e-30)
    tol = 2 * base + ULP[out_dtype] * scale
    assert err <= tol, f"{name}: max |kernel - ref64| = {err:.3e} > {tol:.3e} (fp32 torch reference: {base:.3e})"


# ----------------------------------------------------------------------------------- CPU: the semantics
@pytest.mark.parametrize("conv_layout", ["compact", "d_channels"])
def test_reference_steps_continue_the_scan(conv_layout):
    """prefill L tokens (mixer_scan), then N single steps at permuted slots == one scan over L + N."""
    dims, batch, L, N = SMALL, 3, 7, 5
    layer = make_layer(dims["d_inner"], dims["d_xb"], 16).to(dtype=torch.float64)
    zxbc, dt_low = make_inputs(batch, L + N, dims["d_inner"], dims["d_xb"], dtype=torch.float64)
    y_whole, ssm_whole, conv_whole = mixer_scan(zxbc, dt_low, *layer.params(), **dims, return_final_states=True)
    y_pre, ssm_pre, conv_pre = mixer_scan(zxbc[:, :L], dt_low[:, :L], *layer.params(), **dims, return_final_states=True)
    slots = torch.tensor([4, 0, 2], dtype=torch.int32)
    channels = dims["d_xb"] if conv_layout == "compact" else dims["d_inner"]
    conv, ssm = make_caches(6, dims["d_inner"], dims["d_xb"], 16, channels, 4, torch.float64, torch.float64)
    ssm[slots.long()] = ssm_pre
    pre = conv_pre if conv_layout == "compact" else _expand_conv(conv_pre, dims)
    conv[slots.long(), :, 1:] = pre
    ys = [run_step(zxbc[:, L + t], dt_low[:, L + t], conv, ssm, slots, layer, dims) for t in range(N)]
    torch.testing.assert_close(torch.stack(ys, 1), y_whole[:, L:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ssm[slots.long()], ssm_whole, rtol=1e-10, atol=1e-10)
    final_conv = conv[slots.long(), :, 1:]
    want = conv_whole if conv_layout == "compact" else _expand_conv(conv_whole, dims)
    torch.testing.assert_close(final_conv, want, rtol=0, atol=0)


def _expand_conv(conv_compact, dims):
    """(b, X, S) compact conv window -> the D-channel layout (every repeat holds its source channel)."""
    from apriel_kernels.reference.selective_scan import expand_grouped_channels

    return expand_grouped_channels(conv_compact.transpose(1, 2), dims["d_inner"], dims["d_state"]).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_q_tokens_equal_single_steps(dtype):
    dims, batch, q = SMALL, 2, 3
    layer = make_layer(dims["d_inner"], dims["d_xb"], 16).to(dtype=dtype)
    zxbc, dt_low = make_inputs(batch, q, dims["d_inner"], dims["d_xb"], dtype=dtype)
    conv, ssm = make_caches(3, dims["d_inner"], dims["d_xb"], 16, dims["d_xb"], 3, dtype, dtype)
    conv1, ssm1 = conv.clone(), ssm.clone()
    slots = torch.tensor([2, 0], dtype=torch.int32)
    y_q = run_step(zxbc, dt_low, conv, ssm, slots, layer, dims)
    y_1 = torch.stack([run_step(zxbc[:, t], dt_low[:, t], conv1, ssm1, slots, layer, dims) for t in range(q)], 1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y_q, y_1, rtol=tol, atol=tol)
    torch.testing.assert_close(ssm, ssm1, rtol=tol, atol=tol)
    assert torch.equal(conv, conv1)


def test_reference_permuted_and_padded_slots():
    """Rows at slots [3, -1, 0, 5]: each row == that row alone; padding y = 0; other slots untouched."""
    dims = SMALL
    layer = make_layer(dims["d_inner"], dims["d_xb"], 16)
    zxbc, dt_low = make_inputs(4, 2, dims["d_inner"], dims["d_xb"])
    conv, ssm = make_caches(6, dims["d_inner"], dims["d_xb"], 16, dims["d_xb"], 3, torch.float32, torch.float32)
    conv0, ssm0 = conv.clone(), ssm.clone()
    slots = torch.tensor([3, -1, 0, 5], dtype=torch.int32)
    y = run_step(zxbc, dt_low, conv, ssm, slots, layer, dims)
    for row, slot in enumerate(slots.tolist()):
        if slot < 0:
            assert torch.equal(y[row], torch.zeros_like(y[row]))
            continue
        c1, s1 = conv0[slot : slot + 1].clone(), ssm0[slot : slot + 1].clone()
        y1 = run_step(zxbc[row : row + 1], dt_low[row : row + 1], c1, s1, None, layer, dims)
        torch.testing.assert_close(y[row], y1[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ssm[slot], s1[0], rtol=1e-6, atol=1e-6)
        assert torch.equal(conv[slot], c1[0])
    for slot in (1, 2, 4):
        assert torch.equal(conv[slot], conv0[slot]) and torch.equal(ssm[slot], ssm0[slot])


def test_out_form_writes_the_given_buffer():
    dims = SMALL
    layer = make_layer(dims["d_inner"], dims["d_xb"], 16)
    zxbc, dt_low = make_inputs(3, 1, dims["d_inner"], dims["d_xb"])
    zxbc, dt_low = zxbc[:, 0], dt_low[:, 0]  # the (b, 2D+2X) single-token form
    conv, ssm = make_caches(3, dims["d_inner"], dims["d_xb"], 16, dims["d_xb"], 3, torch.float32, torch.float32)
    conv1, ssm1 = conv.clone(), ssm.clone()
    out = torch.full((3, dims["d_inner"]), float("nan"))
    got = run_step(zxbc, dt_low, conv, ssm, None, layer, dims, out=out)
    assert got is out
    want = run_step(zxbc, dt_low, conv1, ssm1, None, layer, dims)
    assert torch.equal(out, want) and torch.equal(ssm, ssm1) and torch.equal(conv, conv1)


def _op_args(batch=2, q=2, dtype=torch.float32, device="cpu", repeat=True):
    dims = SMALL
    layer = make_layer(dims["d_inner"], dims["d_xb"], 16, repeat=repeat).to(device=device)
    zxbc, dt_low = make_inputs(batch, q, dims["d_inner"], dims["d_xb"], dtype=dtype, device=device)
    conv, ssm = make_caches(batch + 1, dims["d_inner"], dims["d_xb"], 16, dims["d_xb"], 3, dtype, torch.float32, device)
    slots = torch.tensor([batch, 0] + list(range(1, batch - 1)), dtype=torch.int32, device=device)[:batch]
    return (zxbc, dt_low, conv, ssm, slots, *layer.params(), dims["d_inner"], dims["d_xb"], dims["d_state"], repeat)


def test_opcheck_cpu():
    args = _op_args()
    torch.library.opcheck(mixer_step_op, args)
    out = torch.empty(2, 2, SMALL["d_inner"])
    torch.library.opcheck(mixer_step_out_op, (*args, out))


@pytest.mark.parametrize("use_out", [False, True], ids=["returns-y", "out="])
def test_compile_fullgraph_does_not_copy_the_caches(use_out):
    """torch.compile re-inplaces the mutated caches (and out): no clone / copy of them in the code."""
    from torch._inductor.utils import run_and_get_code

    dims = SMALL
    layer = make_layer(dims["d_inner"], dims["d_xb"], 16)
    zxbc, dt_low = make_inputs(2, 1, dims["d_inner"], dims["d_xb"])
    conv, ssm = make_caches(3, dims["d_inner"], dims["d_xb"], 16, dims["d_xb"], 3, torch.float32, torch.float32)
    conv1, ssm1 = conv.clone(), ssm.clone()
    slots = torch.tensor([2, 0], dtype=torch.int32)
    out = torch.full((2, 1, dims["d_inner"]), float("nan")) if use_out else None

    def step(zxbc, dt_low, conv, ssm, slots, out):
        return run_step(zxbc, dt_low, conv, ssm, slots, layer, dims, out=out)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    y, codes = run_and_get_code(compiled, zxbc, dt_low, conv, ssm, slots, out)
    want = step(zxbc, dt_low, conv1, ssm1, slots, None)
    if use_out:
        assert y is out or torch.equal(y, out)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ssm, ssm1, rtol=1e-6, atol=1e-6)  # the caches really were updated in place
    assert torch.equal(conv, conv1)
    # The body of the generated call(): the op must receive the caches themselves, nothing else may
    # allocate or copy (the module boilerplate imports empty_strided, hence the slicing).
    code = "\n".join(codes)
    body = code[code.index("def call(") :]
    body = body[: body.index("return (")]
    op = "apriel.mixer_step_out.default(" if use_out else "apriel.mixer_step.default("
    assert op in body, f"the compiled code does not call the op:\n{body}"
    for word in ("clone", "copy_", "empty_strided", "empty(", "cpp_fused"):
        assert word not in body, f"compiled code contains {word!r} (a copy of a cache?):\n{body}"


def _bad_call(**overrides):
    dims = SMALL
    layer = make_layer(dims["d_inner"], dims["d_xb"], 16)
    zxbc, dt_low = make_inputs(2, 1, dims["d_inner"], dims["d_xb"])
    conv, ssm = make_caches(3, dims["d_inner"], dims["d_xb"], 16, dims["d_xb"], 3, torch.float32, torch.float32)
    args = dict(zxbc=zxbc, dt_low=dt_low, conv_state=conv, ssm_state=ssm, slot_idx=torch.tensor([0, 2], dtype=torch.int32),
                conv_weight=layer.conv_weight, conv_bias=layer.conv_bias, dt_proj_weight=layer.dt_proj_weight,
                dt_proj_bias=layer.dt_proj_bias, A_log=layer.A_log, D=layer.D)
    args.update(overrides)
    return mixer_step(**args, **dims)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(zxbc=torch.randn(2, 1, 100)), ValueError, r"zxbc dim 2: expected zxbc_width = 320"),
        (dict(dt_low=torch.randn(2, 1, 16, dtype=torch.float64)), TypeError, r"dt_low: expected dtype in \(float32\)"),
        (dict(ssm_state=torch.randn(3, 8, 16, 8)), ValueError, r"ssm_state: expected shape"),
        (dict(ssm_state=torch.randn(3, 8, 16, 16).half()), TypeError, r"ssm_state: expected dtype in"),
        (dict(conv_state=torch.randn(3, 48, 3)), ValueError, r"conv_state: expected \(slots, one of \(32, 128\)"),
        (dict(conv_state=torch.randn(3, 32, 2)), ValueError, r"conv_state: expected .* >= 3"),
        (dict(conv_state=torch.randn(4, 32, 3)), ValueError, r"ssm_state dim 0: expected slots = 4"),
        (dict(slot_idx=torch.tensor([0, 1])), TypeError, r"slot_idx: expected dtype in \(int32\)"),
        (dict(slot_idx=torch.tensor([0, 3], dtype=torch.int32)), ValueError, r"slot_idx: expected values in \[0, 3\)"),
        (dict(slot_idx=torch.tensor([0], dtype=torch.int32)), ValueError, r"slot_idx dim 0: expected batch = 2"),
        (dict(A_log=torch.randn(128, 16).half()), TypeError, r"A_log: expected dtype"),
        (dict(dt_proj_bias=torch.randn(64)), ValueError, r"dt_proj_bias dim 0: expected d_inner = 128"),
        (dict(out=torch.empty(2, 1, 64)), ValueError, r"out: expected shape \(2, 1, 128\)"),
        (dict(out=torch.empty(2, 1, 128, dtype=torch.float16)), TypeError, r"out: expected dtype in \(float32\)"),
    ],
    ids=["zxbc-width", "dt-dtype", "ssm-shape", "ssm-dtype", "conv-channels", "conv-len", "conv-slots", "slot-dtype",
         "slot-range", "slot-batch", "alog-dtype", "dtbias-shape", "out-shape", "out-dtype"],
)
def test_bad_inputs_name_the_argument(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**overrides)


def test_kernel_support_limits_are_python_errors():
    from apriel_kernels.mixer_step import check_kernel_support

    check_kernel_support(4096, 1024, 16)
    check_kernel_support(128, 128, 16)
    with pytest.raises(ValueError, match=r"d_inner / d_xb: expected a divisor of 16 for the CUDA step kernel, got 3"):
        check_kernel_support(48, 16, 16)
    with pytest.raises(ValueError, match=r"d_state: the CUDA step kernel supports d_state = 16, got 8"):
        check_kernel_support(64, 16, 8)


def test_missing_slots_without_index():
    with pytest.raises(ValueError, match=r"ssm_state: expected at least batch = 2 slots"):
        _bad_call(slot_idx=None, conv_state=torch.randn(1, 32, 3), ssm_state=torch.randn(1, 8, 16, 16))


# ------------------------------------------------------------------------------------- GPU: the kernel
def _gpu_case(dims, batch, q, act, state_dtype, conv_layout, state_len=3, width=4, dt_rank=16, repeat=True,
              strided=False, param_dtype=None, conv_dtype=None, strided_params=False):
    dev = "cuda"
    layer32 = make_layer(dims["d_inner"], dims["d_xb"], 16, dt_rank=dt_rank, width=width, repeat=repeat)
    layer = layer32.to(device=dev, dtype=param_dtype) if param_dtype else layer32.to(device=dev)
    if strided_params:  # column-major A_log / dt_proj_weight: the kernel's element-wise parameter reads
        layer.A_log = layer.A_log.t().contiguous().t()
        layer.dt_proj_weight = layer.dt_proj_weight.t().contiguous().t()
    zxbc, dt_low = make_inputs(batch, q, dims["d_inner"], dims["d_xb"], dt_rank, act, dev, strided)
    channels = dims["d_xb"] if conv_layout == "compact" else dims["d_inner"]
    slots = batch + 3
    conv, ssm = make_caches(slots, dims["d_inner"], dims["d_xb"], 16, channels, state_len, conv_dtype or act, state_dtype, dev)
    perm = torch.randperm(slots, device=dev)[:batch].to(torch.int32)
    if batch > 2:
        perm[1] = -1  # one padding row
    return layer, zxbc, dt_low, conv, ssm, perm


def _compare_with_references(dims, layer, zxbc, dt_low, conv, ssm, slots, repeat=True, tag=""):
    """Runs the kernel on (conv, ssm) in place and checks y and both caches against float64 / fp32 torch."""
    conv32, ssm32 = conv.clone(), ssm.clone()
    conv64, ssm64 = conv.double(), ssm.double()
    y32 = run_ref(zxbc, dt_low, conv32, ssm32, slots, layer, dims, repeat)
    y64 = run_ref(*as64(zxbc, dt_low), conv64, ssm64, slots, layer.to(dtype=torch.float64), dims, repeat)
    out = torch.full(y32.shape, float("nan"), dtype=zxbc.dtype, device=zxbc.device)
    y = run_step(zxbc, dt_low, conv, ssm, slots, layer, dims, repeat, out=out)
    assert y is out
    assert_close_to_ref(f"y{tag}", y, y64, y32, zxbc.dtype)
    assert_close_to_ref(f"ssm_state{tag}", ssm, ssm64, ssm32, ssm.dtype)
    assert torch.equal(conv, conv32), f"conv_state{tag}: differs from the reference's shifted window"
    return y


@pytest.fixture(params=["v2", "v1", "v3"])
def variant(request, monkeypatch):
    """Runs a kernel test with v2, v1 and v3 named explicitly (the host reads APRIEL_STEP_KERNEL per call; the
    default is v2 below batch 64 and v3 from there; v3 takes q = 1 with fp16/bf16 activations and hands other
    calls to v2)."""
    monkeypatch.delenv("APRIEL_STEP_V3_SEQ", raising=False)
    monkeypatch.setenv("APRIEL_STEP_KERNEL", request.param)
    return request.param


GPU_CASES = [
    # (act, state, conv layout, q, extra)
    (torch.bfloat16, torch.float32, "compact", 1, {}),
    (torch.bfloat16, torch.bfloat16, "compact", 1, {}),
    (torch.float16, torch.float32, "d_channels", 1, {}),
    (torch.float32, torch.float32, "compact", 1, {}),
    (torch.float32, torch.bfloat16, "d_channels", 3, {}),
    (torch.bfloat16, torch.float32, "d_channels", 4, dict(state_len=4)),
    (torch.bfloat16, torch.float32, "compact", 2, dict(strided=True, param_dtype=torch.bfloat16)),
    (torch.float32, torch.float32, "compact", 5, dict(width=3, state_len=5, dt_rank=20, conv_dtype=torch.float32)),
    (torch.float16, torch.bfloat16, "compact", 1, dict(repeat=False, width=2, state_len=1)),
    (torch.bfloat16, torch.float32, "compact", 1, dict(conv_dtype=torch.float32)),
    (torch.bfloat16, torch.float32, "compact", 1, dict(strided_params=True)),
    (torch.float16, torch.float32, "compact", 1, dict(param_dtype=torch.float16)),
]


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("act, state_dtype, conv_layout, q, extra", GPU_CASES,
                         ids=[f"{str(a)[6:]}-{str(s)[6:]}-{c}-q{q}" + ("-" + "-".join(e) if e else "")
                              for a, s, c, q, e in GPU_CASES])
def test_kernel_matches_float64_reference(variant, batch, act, state_dtype, conv_layout, q, extra):
    repeat = extra.get("repeat", True)
    layer, zxbc, dt_low, conv, ssm, slots = _gpu_case(SMALL, batch, q, act, state_dtype, conv_layout, **extra)
    _compare_with_references(SMALL, layer, zxbc, dt_low, conv, ssm, slots, repeat)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_kernel_h1_shape(batch, state_dtype):
    layer, zxbc, dt_low, conv, ssm, slots = _gpu_case(H1, batch, 1, torch.bfloat16, state_dtype, "compact")
    _compare_with_references(H1, layer, zxbc, dt_low, conv, ssm, slots)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("dims", [dict(d_inner=48, d_xb=48, d_state=16), dict(d_inner=64, d_xb=32, d_state=16),
                                  dict(d_inner=256, d_xb=32, d_state=16), dict(d_inner=512, d_xb=32, d_state=16)],
                         ids=["r1-X48", "r2", "r8", "r16"])
@pytest.mark.parametrize("conv_layout, q", [("compact", 1), ("d_channels", 1), ("compact", 3)])
def test_kernel_other_group_ratios(variant, dims, conv_layout, q):
    """r = D/X in {1, 2, 8, 16}: v2 puts the r repeats of an x channel in one warp (w = 32/r source channels,
    r = 1 with X % 32 = 16 leaves half a warp idle), v1 one x/B group per block."""
    layer, zxbc, dt_low, conv, ssm, slots = _gpu_case(dims, 5, q, torch.bfloat16, torch.float32, conv_layout)
    _compare_with_references(dims, layer, zxbc, dt_low, conv, ssm, slots)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [5, 67])
def test_kernel_sequences_per_thread(monkeypatch, batch, state_dtype):
    """v2 with 1, 2 and 4 sequences per thread (the batch-size default and the benchmark sweeps): each
    matches the references, and all three agree to an fp32 rounding (same math per channel; only FMA
    contraction choices of the three instantiations may differ) with bit-equal conv caches."""
    monkeypatch.setenv("APRIEL_STEP_KERNEL", "v2")  # v2 by name: the default is v3 from batch 64
    dims = H1 if batch == 5 else SMALL
    layer, zxbc, dt_low, conv, ssm, slots = _gpu_case(dims, batch, 1, torch.bfloat16, state_dtype, "compact")
    results = []
    for spt in ("1", "2", "4"):
        monkeypatch.setenv("APRIEL_STEP_SEQ_PER_THREAD", spt)
        c, s = conv.clone(), ssm.clone()
        y = _compare_with_references(dims, layer, zxbc, dt_low, c, s, slots, tag=f"[seq{spt}]")
        results.append((y, c, s))
    for y, c, s in results[1:]:
        torch.testing.assert_close(y.float(), results[0][0].float(), rtol=2**-8, atol=1e-6)
        torch.testing.assert_close(s.float(), results[0][2].float(), rtol=2**-8 if state_dtype == torch.bfloat16
                                   else 1e-6, atol=1e-6)
        assert torch.equal(c, results[0][1])


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("kernel", ["v2", "v3"])
def test_kernel_pdl_graph_equals_eager(monkeypatch, kernel):
    """v2 / v3 with programmatic dependent launch (APRIEL_STEP_PDL=1): a captured chain of 8 dependent steps
    (each reads the caches the previous one wrote), replayed 20 times, is bit-equal to eager steps without PDL."""
    monkeypatch.setenv("APRIEL_STEP_KERNEL", kernel)
    monkeypatch.delenv("APRIEL_STEP_V3_SEQ", raising=False)
    dims, batch, chain = H1, 16, 8
    layer, zxbc, dt_low, conv, ssm, slots = _gpu_case(dims, batch, 1, torch.bfloat16, torch.float32, "compact")
    conv_e, ssm_e = conv.clone(), ssm.clone()
    out = torch.empty(chain, batch, 1, dims["d_inner"], dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv("APRIEL_STEP_PDL", "1")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on copies
        run_step(zxbc, dt_low, conv.clone(), ssm.clone(), slots, layer, dims, out=out[0])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k in range(chain):
            run_step(zxbc, dt_low, conv, ssm, slots, layer, dims, out=out[k])
    monkeypatch.delenv("APRIEL_STEP_PDL")
    for _ in range(20):
        graph.replay()
        for k in range(chain):
            y_e = run_step(zxbc, dt_low, conv_e, ssm_e, slots, layer, dims)
            assert torch.equal(out[k], y_e)
    torch.cuda.synchronize()
    assert torch.equal(ssm, ssm_e) and torch.equal(conv, conv_e)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims, batch", [(SMALL, 67), (H1, 40)], ids=["small-b67", "h1-b40"])
def test_kernel_v3_stage_ring(monkeypatch, dims, batch, state_dtype):
    """v3 with 1, 3 and 32 sequences per warp (APRIEL_STEP_V3_SEQ) and the launcher's choice: 32 rows per
    warp wrap the 4-stage TMA ring 8 times, with padding rows in it (their stages only arrive). Each run
    matches the references; all are bit-equal (the same code per channel and row, whatever the run)."""
    monkeypatch.setenv("APRIEL_STEP_KERNEL", "v3")
    layer, zxbc, dt_low, conv, ssm, slots = _gpu_case(dims, batch, 1, torch.bfloat16, state_dtype, "compact")
    slots[5::7] = -1  # more padding rows, at several ring positions
    results = []
    for spw in ("1", "3", "32", None):
        _set_rows_per_warp(monkeypatch, spw)
        c, s = conv.clone(), ssm.clone()
        y = _compare_with_references(dims, layer, zxbc, dt_low, c, s, slots, tag=f"[v3 seq{spw}]")
        results.append((y, c, s))
    for y, c, s in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(s, results[0][2]) and torch.equal(c, results[0][1])


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims, batch", [(SMALL, 67), (H1, 64)], ids=["small-b67", "h1-b64"])
def test_kernel_v3_eight_stage_ring(monkeypatch, dims, batch, state_dtype):
    """v3 with the 8-deep state ring (APRIEL_STEP_V3_STAGES=8: 72.5 KB of dynamic shared memory per 4-warp block
    with fp32 state) at 1, 5, 9 and 32 rows per warp and the launcher's choice, padding rows at several ring
    positions: each run matches the references and is bit-equal to the default 4-deep ring (same math, only
    the number of rows in flight differs)."""
    monkeypatch.setenv("APRIEL_STEP_KERNEL", "v3")
    layer, zxbc, dt_low, conv, ssm, slots = _gpu_case(dims, batch, 1, torch.bfloat16, state_dtype, "compact")
    slots[5::7] = -1
    monkeypatch.delenv("APRIEL_STEP_V3_STAGES", raising=False)
    monkeypatch.delenv("APRIEL_STEP_V3_SEQ", raising=False)
    c4, s4 = conv.clone(), ssm.clone()
    y4 = _compare_with_references(dims, layer, zxbc, dt_low, c4, s4, slots, tag="[v3 4 stages]")
    monkeypatch.setenv("APRIEL_STEP_V3_STAGES", "8")
    for spw in ("1", "5", "9", "32", None):
        _set_rows_per_warp(monkeypatch, spw)
        c, s = conv.clone(), ssm.clone()
        y = _compare_with_references(dims, layer, zxbc, dt_low, c, s, slots, tag=f"[v3 8 stages seq{spw}]")
        assert torch.equal(y, y4) and torch.equal(s, s4) and torch.equal(c, c4), f"8 stages seq{spw} != 4 stages"


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_kernel_v3_equals_v2(monkeypatch, state_dtype):
    """v3 == v2 at the H1 shape: the same per-state math (states equal up to FMA contraction choices of the
    two kernels, bit-equal conv caches); y differs at most by the order of the 16-term C readout sum (v3
    walks the states in a lane-rotated order): about 1 bf16 ulp."""
    monkeypatch.delenv("APRIEL_STEP_V3_SEQ", raising=False)
    layer, zxbc, dt_low, conv, ssm, slots = _gpu_case(H1, 24, 1, torch.bfloat16, state_dtype, "compact")
    outs = {}
    for kernel in ("v2", "v3"):
        monkeypatch.setenv("APRIEL_STEP_KERNEL", kernel)
        c, s = conv.clone(), ssm.clone()
        outs[kernel] = (run_step(zxbc, dt_low, c, s, slots, layer, H1), c, s)
    (y2, c2, s2), (y3, c3, s3) = outs["v2"], outs["v3"]
    assert torch.equal(c2, c3)
    torch.testing.assert_close(s3.float(), s2.float(), rtol=2**-8 if state_dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    torch.testing.assert_close(y3.float(), y2.float(), rtol=2**-7, atol=1e-5)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_kernel_v3_fast_and_general_row_loops_agree(monkeypatch, state_dtype):
    """v3 compiles its row loop twice: a fast loop for the decode configuration (32-byte aligned zxbc rows,
    dt_rank 16, conv cache of the activation dtype with unit position stride, S <= 4, whole channel warps)
    and a general one. The same step through both: zxbc as a view whose rows are 16- but not 32-byte
    aligned, and a conv cache with a non-unit position stride, each send v3 down the general loop. Every
    run matches the references; states and conv caches agree with the fast loop's, y within 1 bf16 ulp."""
    monkeypatch.setenv("APRIEL_STEP_KERNEL", "v3")
    monkeypatch.setenv("APRIEL_STEP_V3_SEQ", "3")  # several rows per warp: the prefetch ring in both loops
    batch = 20
    layer, zxbc, dt_low, conv, ssm, slots = _gpu_case(H1, batch, 1, torch.bfloat16, state_dtype, "compact")
    assert zxbc.data_ptr() % 32 == 0 and (zxbc.stride(0) * 2) % 32 == 0  # the fast loop's precondition
    # 16-byte aligned rows that are not 32-byte aligned: offset 8 elements (16 B), row stride 16 B off 32.
    wide = torch.randn(batch, 1, zxbc.shape[-1] + 8, dtype=zxbc.dtype, device=zxbc.device)
    zxbc16 = wide[..., 8:]
    zxbc16.copy_(zxbc)
    assert zxbc16.data_ptr() % 32 == 16 and (zxbc16.stride(0) * 2) % 32 == 16
    # The same conv cache with positions strided (slots, S, X) -> (slots, X, S) view.
    conv_t = conv.transpose(1, 2).contiguous().transpose(1, 2)
    assert conv_t.stride(2) != 1 and torch.equal(conv_t, conv)
    runs = {}
    for name, zx, cv in (("fast", zxbc, conv), ("general-rows", zxbc16, conv), ("general-conv", zxbc, conv_t)):
        c, s = cv.clone(memory_format=torch.preserve_format), ssm.clone()
        y = _compare_with_references(H1, layer, zx, dt_low, c, s, slots, tag=f"[v3 {name}]")
        runs[name] = (y, c, s)
    y0, c0, s0 = runs["fast"]
    for name in ("general-rows", "general-conv"):
        y, c, s = runs[name]
        assert torch.equal(c, c0), f"{name}: conv cache differs from the fast loop's"
        torch.testing.assert_close(s.float(), s0.float(), rtol=2**-8 if state_dtype == torch.bfloat16 else 1e-6, atol=1e-6)
        torch.testing.assert_close(y.float(), y0.float(), rtol=2**-7, atol=1e-5)


# v3's TMA paths (APRIEL_STEP_V3_TMA: the state as one tensor-map copy per row and direction; APRIEL_STEP_V3_CONV_STAGE:
# the conv rows staged with it; both default on): (case id, dims, batch, slot count, conv state_len S, slot stride
# padded, paths the layouts allow: bit 0 tensor map, bit 1 staged conv rows). Slot counts are primes (the map's slot
# dim is not a multiple of anything) and the last slot is always used. Fallbacks: r = 1 with X % 32 = 16 (a half
# warp: no map), r = 8 / 16 with S = 3 (a warp's conv rows are 24 / 12 bytes: not a bulk-copy size).
V3_TMA_CASES = [
    ("h1-b1", H1, 1, 7, 3, False, 3),
    ("h1-b3-S4", H1, 3, 13, 4, False, 3),
    ("h1-b5-S2", H1, 5, 11, 2, False, 3),
    ("h1-b67-padded-stride", H1, 67, 139, 3, True, 3),
    ("small-b67", SMALL, 67, 131, 3, False, 3),
    ("r1-X64", dict(d_inner=64, d_xb=64, d_state=16), 5, 11, 3, True, 3),
    ("r1-X48-fallback", dict(d_inner=48, d_xb=48, d_state=16), 5, 11, 3, False, 0),
    ("r2", dict(d_inner=64, d_xb=32, d_state=16), 5, 11, 3, False, 3),
    ("r8-conv-fallback", dict(d_inner=256, d_xb=32, d_state=16), 5, 11, 3, False, 1),
    ("r16-conv-fallback", dict(d_inner=512, d_xb=32, d_state=16), 5, 11, 3, True, 1),
]
# (APRIEL_STEP_V3_TMA, APRIEL_STEP_V3_CONV_STAGE, APRIEL_STEP_V3_DIRECT_STORE): the defaults, the map without staged
# conv rows, the per-lane copies, and both loads with the state stored from registers (no TMA / bulk store).
V3_COPY_PATHS = [("1", "1", "0"), ("1", "0", "0"), ("0", "1", "0"), ("1", "1", "1"), ("0", "0", "1")]


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, dims, batch, nslots, state_len, padded, paths", V3_TMA_CASES,
                         ids=[c[0] for c in V3_TMA_CASES])
def test_kernel_v3_tma_paths_equal_per_lane_copies(monkeypatch, name, dims, batch, nslots, state_len, padded, paths,
                                                    state_dtype):
    """v3's copy paths: the state as one 3-D TMA tensor copy per row and direction with the conv rows staged on the
    same barrier (the defaults), the tensor map with register-prefetched conv rows, the session-3 per-lane
    cp.async.bulk chunks, and the state stored from registers (direct store) after either load, each at 1 / 3 rows
    per warp and the launcher's choice, with permuted slots and padding
    rows, a prime slot count, the last slot in use and (padded) a slot stride one 16-channel block longer than the
    slot. Every run matches the references and all are bit-equal (same bytes into the same shared layout, same
    math); unused slots and the padding between slots stay bit-untouched (the tensor store writes only its box)."""
    d_inner, d_xb = dims["d_inner"], dims["d_xb"]
    monkeypatch.setenv("APRIEL_STEP_KERNEL", "v3")
    layer, zxbc, dt_low, _, _, _ = _gpu_case(dims, batch, 1, torch.bfloat16, state_dtype, "compact",
                                             width=min(4, state_len + 1))
    conv, ssm = make_caches(nslots, d_inner, d_xb, 16, d_xb, state_len, torch.bfloat16, state_dtype, "cuda")
    store = ssm
    if padded:  # (slots, D/16 + 1, 16, 16) storage, the cache is the first D/16 blocks of every slot
        store = (0.5 * torch.randn(nslots, d_inner // 16 + 1, 16, 16, device="cuda")).to(state_dtype)
        store[:, : d_inner // 16] = ssm
        ssm = store[:, : d_inner // 16]
        assert ssm.stride(0) != ssm[0].numel()
    used = torch.randperm(nslots - 1, device="cuda")[: batch - 1].to(torch.int32)
    slots = torch.cat([used, torch.tensor([nslots - 1], dtype=torch.int32, device="cuda")])
    slots = slots[torch.randperm(batch, device="cuda")]
    if batch > 2:
        slots[1] = -1
        slots[5::7] = -1
    assert torch.ops.apriel_C.mixer_step_v3_paths(zxbc, conv, ssm, d_inner, d_xb) == paths
    runs = []
    for tma, conv_stage, direct in V3_COPY_PATHS:
        monkeypatch.setenv("APRIEL_STEP_V3_TMA", tma)
        monkeypatch.setenv("APRIEL_STEP_V3_CONV_STAGE", conv_stage)
        monkeypatch.setenv("APRIEL_STEP_V3_DIRECT_STORE", direct)
        for spw in ("1", "3", None):
            _set_rows_per_warp(monkeypatch, spw)
            c, s_store = conv.clone(), store.clone()
            s = s_store[:, : d_inner // 16] if padded else s_store
            tag = f"[v3 tma={tma} conv_stage={conv_stage} direct_store={direct} seq{spw}]"
            y = _compare_with_references(dims, layer, zxbc, dt_low, c, s, slots, tag=tag)
            runs.append((tag, y, c, s_store))
    first, y0, c0, s0 = runs[0]
    for tag, y, c, s in runs[1:]:
        assert torch.equal(y, y0) and torch.equal(c, c0) and torch.equal(s, s0), f"{tag} != {first}"
    live = set(slots[slots >= 0].tolist())
    for slot in set(range(nslots)) - live:  # unused slots: bit-untouched (the whole slot incl. padding)
        assert torch.equal(s0[slot], store[slot]) and torch.equal(c0[slot], conv[slot]), f"unused slot {slot} written"
    if padded:  # the block between slots: never written
        assert torch.equal(s0[:, d_inner // 16 :], store[:, d_inner // 16 :]), "padding between slots was written"


@pytest.mark.gpu
@needs_kernel
def test_kernel_2000_steps_drift():
    """2,000 consecutive steps at the H1 shape: the kernel's drift vs float64 stays within 2x the drift of
    PyTorch doing the same in fp32 (fp32 state), resp. with a bf16 cache; figures go to $OUT/step_drift.json."""
    dims, batch, steps = H1, 2, 2000
    layer = make_layer(dims["d_inner"], dims["d_xb"], 16).to(device="cuda")
    layer64 = layer.to(dtype=torch.float64)
    conv0, ssm0 = make_caches(batch, dims["d_inner"], dims["d_xb"], 16, dims["d_xb"], 3, torch.bfloat16, torch.float32, "cuda")
    chains = {  # name -> (conv, ssm, step function)
        "ref64": [conv0.double(), ssm0.double()],
        "ref32_fp32": [conv0.clone(), ssm0.clone()],
        "ref32_bf16": [conv0.clone(), ssm0.to(torch.bfloat16)],
        "kernel_fp32": [conv0.clone(), ssm0.clone()],
        "kernel_bf16": [conv0.clone(), ssm0.to(torch.bfloat16)],
    }
    y_err = {k: 0.0 for k in chains if k != "ref64"}
    y_scale = 0.0
    for _ in range(steps):
        zxbc, dt_low = make_inputs(batch, 1, dims["d_inner"], dims["d_xb"], dtype=torch.bfloat16, device="cuda")
        ys = {}
        for name, (conv, ssm) in chains.items():
            if name == "ref64":
                ys[name] = run_ref(*as64(zxbc, dt_low), conv, ssm, None, layer64, dims)
            elif name.startswith("ref32"):
                ys[name] = run_ref(zxbc, dt_low, conv, ssm, None, layer, dims)
            else:
                ys[name] = run_step(zxbc, dt_low, conv, ssm, None, layer, dims)
        y_scale = max(y_scale, ys["ref64"].abs().max().item())
        for name in y_err:
            y_err[name] = max(y_err[name], (ys[name].double() - ys["ref64"]).abs().max().item())
    ref_state = chains["ref64"][1]
    s_scale = ref_state.abs().max().item()
    s_err = {name: (chains[name][1].double() - ref_state).abs().max().item() for name in y_err}
    report = {"steps": steps, "batch": batch, "y_max_abs": y_scale, "state_max_abs": s_scale,
              "y_max_err": y_err, "state_max_err_after": s_err,
              "state_rel_err_after": {k: v / s_scale for k, v in s_err.items()}}
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "step_drift.json"), "w") as f:
            json.dump(report, f, indent=1)
    for kind in ("fp32", "bf16"):
        k, r = f"kernel_{kind}", f"ref32_{kind}"
        tol_y = 2 * y_err[r] + ULP[torch.bfloat16] * y_scale
        assert y_err[k] <= tol_y, f"{k}: y drift {y_err[k]:.3e} > {tol_y:.3e}; {report}"
        tol_s = 2 * s_err[r] + ULP[torch.float32] * s_scale
        assert s_err[k] <= tol_s, f"{k}: state drift {s_err[k]:.3e} > {tol_s:.3e}; {report}"


@pytest.mark.gpu
@needs_kernel
def test_kernel_prefill_then_steps_equals_whole_scan(monkeypatch):
    """mixer_scan over L tokens, then N kernel steps == mixer_scan over L + N (final states too)."""
    from apriel_kernels._ext import has_kernel

    if not has_kernel("mixer_scan_fwd"):
        monkeypatch.setenv("APRIEL_KERNELS_ALLOW_REFERENCE", "1")  # the scan kernel is another family
    dims, batch, L, N = H1, 2, 33, 6
    layer = make_layer(dims["d_inner"], dims["d_xb"], 16).to(device="cuda")
    zxbc, dt_low = make_inputs(batch, L + N, dims["d_inner"], dims["d_xb"], dtype=torch.float32, device="cuda")
    y64, ssm64, conv64 = mixer_scan_ref(*as64(zxbc, dt_low), *layer.to(dtype=torch.float64).params(), **dims,
                                        return_final_states=True)
    y32, ssm32, _ = mixer_scan_ref(zxbc, dt_low, *layer.params(), **dims, return_final_states=True)
    _, ssm_pre, conv_pre = mixer_scan(zxbc[:, :L], dt_low[:, :L], *layer.params(), **dims, return_final_states=True)
    slots = torch.tensor([3, 1], dtype=torch.int32, device="cuda")
    conv, ssm = make_caches(4, dims["d_inner"], dims["d_xb"], 16, dims["d_xb"], 3, torch.float32, torch.float32, "cuda")
    conv[slots.long()] = conv_pre.to(conv.dtype)
    ssm[slots.long()] = ssm_pre.float()
    ys = torch.stack([run_step(zxbc[:, L + t], dt_low[:, L + t], conv, ssm, slots, layer, dims) for t in range(N)], 1)
    assert_close_to_ref("y", ys, y64[:, L:], y32[:, L:], torch.float32)
    assert_close_to_ref("ssm_state", ssm[slots.long()], ssm64, ssm32, torch.float32)
    torch.testing.assert_close(conv[slots.long()].double(), conv64, rtol=0, atol=0)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_kernel_slots_and_padding(variant, state_dtype):
    """Permuted + padded slots == each row alone at slot 0 of its own cache; other slots bit-untouched."""
    dims, batch = SMALL, 6
    layer, zxbc, dt_low, conv, ssm, _ = _gpu_case(dims, batch, 2, torch.bfloat16, state_dtype, "compact")
    slots = torch.tensor([7, -1, 0, 4, -1, 8], dtype=torch.int32, device="cuda")
    conv0, ssm0 = conv.clone(), ssm.clone()
    y = run_step(zxbc, dt_low, conv, ssm, slots, layer, dims, out=torch.full((batch, 2, dims["d_inner"]), float("nan"),
                                                                                dtype=torch.bfloat16, device="cuda"))
    for row, slot in enumerate(slots.tolist()):
        if slot < 0:
            assert torch.equal(y[row], torch.zeros_like(y[row])), "padding rows must be 0"
            continue
        c1, s1 = conv0[slot : slot + 1].clone(), ssm0[slot : slot + 1].clone()
        y1 = run_step(zxbc[row : row + 1], dt_low[row : row + 1], c1, s1, None, layer, dims)
        assert torch.equal(y[row], y1[0]) and torch.equal(ssm[slot], s1[0]) and torch.equal(conv[slot], c1[0])
    for slot in set(range(conv.shape[0])) - {7, 0, 4, 8}:
        assert torch.equal(conv[slot], conv0[slot]) and torch.equal(ssm[slot], ssm0[slot])


@pytest.mark.gpu
@needs_kernel
def test_kernel_q_tokens_equal_single_steps(variant):
    dims, batch, q = H1, 3, 4
    layer, zxbc, dt_low, conv, ssm, slots = _gpu_case(dims, batch, q, torch.bfloat16, torch.float32, "compact")
    conv1, ssm1 = conv.clone(), ssm.clone()
    y_q = run_step(zxbc, dt_low, conv, ssm, slots, layer, dims)
    y_1 = torch.stack([run_step(zxbc[:, t], dt_low[:, t], conv1, ssm1, slots, layer, dims) for t in range(q)], 1)
    # Same fp32 math in the same order; only FMA contraction choices may differ: allow 1 bf16 ulp in y.
    torch.testing.assert_close(y_q.float(), y_1.float(), rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(ssm, ssm1, rtol=1e-6, atol=1e-6)
    assert torch.equal(conv, conv1)


@pytest.mark.gpu
@needs_kernel
def test_kernel_cuda_graph_replays_equal_eager(variant):
    dims, batch = H1, 8
    layer, zxbc, dt_low, conv, ssm, slots = _gpu_case(dims, batch, 1, torch.bfloat16, torch.float32, "compact")
    conv_e, ssm_e = conv.clone(), ssm.clone()
    inputs = [make_inputs(batch, 1, dims["d_inner"], dims["d_xb"], dtype=torch.bfloat16, device="cuda") for _ in range(100)]
    out = torch.empty(batch, 1, dims["d_inner"], dtype=torch.bfloat16, device="cuda")
    static_z, static_dt = zxbc.clone(), dt_low.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on copies so the real caches advance only in the replays
        run_step(static_z, static_dt, conv.clone(), ssm.clone(), slots, layer, dims, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_step(static_z, static_dt, conv, ssm, slots, layer, dims, out=out)
    for z, dt in inputs:
        static_z.copy_(z)
        static_dt.copy_(dt)
        graph.replay()
        y_e = run_step(z, dt, conv_e, ssm_e, slots, layer, dims)
        assert torch.equal(out, y_e)
    torch.cuda.synchronize()
    assert torch.equal(ssm, ssm_e) and torch.equal(conv, conv_e)


@pytest.mark.gpu
@needs_kernel
def test_opcheck_cuda():
    args = _op_args(batch=3, q=2, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(mixer_step_op, args)
    out = torch.empty(3, 2, SMALL["d_inner"], dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(mixer_step_out_op, (*args, out))


@pytest.mark.gpu
@needs_kernel
def test_kernel_rejects_unsupported_shapes():
    dims = dict(d_inner=48, d_xb=16, d_state=16)  # r = 3 does not divide 16: no whole x/B group per block
    layer = make_layer(48, 16, 16).to(device="cuda")
    zxbc, dt_low = make_inputs(1, 1, 48, 16, dtype=torch.bfloat16, device="cuda")
    conv, ssm = make_caches(1, 48, 16, 16, 16, 3, torch.bfloat16, torch.float32, "cuda")
    # Raised in Python before the extension is called (a failing TORCH_CHECK inside the extension
    # crashed the pytest process on the device machine: see docs/notes/step.md).
    with pytest.raises(ValueError, match=r"d_inner / d_xb: expected a divisor of 16"):
        run_step(zxbc, dt_low, conv, ssm, None, layer, dims)
