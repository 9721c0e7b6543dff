"""The references against naive float64 loops, and the mixer's state-continuity contracts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apriel_kernels.reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    expand_grouped_channels,
    mixer_scan_ref,
    mixer_step_ref,
    selective_scan_ref,
    softplus_ref,
)

F64 = torch.float64


def naive_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, d_state):
    """Per-(batch, channel, state) scalar loop, written straight from mixer.md section 3."""
    batch, seqlen, d_inner = delta.shape
    du, gb, gc = u.shape[2], B.shape[2], C.shape[2]
    r = d_inner // du
    y = torch.zeros(batch, seqlen, d_inner, dtype=F64)
    final = torch.zeros(batch, d_inner, d_state, dtype=F64)
    for b in range(batch):
        for c in range(d_inner):
            src = (c // (d_state * r)) * d_state + c % d_state
            h = initial_state[b, c].clone() if initial_state is not None else torch.zeros(d_state, dtype=F64)
            for t in range(seqlen):
                if seq_idx is not None and t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                    h = torch.zeros(d_state, dtype=F64)
                dt = softplus_ref(delta[b, t, c] + delta_bias[c])
                uu = u[b, t, src]
                h = torch.exp(dt * A[c]) * h + dt * B[b, t, c // (d_inner // gb)] * uu
                yy = (C[b, t, c // (d_inner // gc)] * h).sum() + D[c] * uu
                y[b, t, c] = yy * F.silu(z[b, t, c])
            final[b, c] = h
    return y, final


@pytest.mark.parametrize("grouped", [False, True], ids=["u_full", "u_grouped"])
@pytest.mark.parametrize("packed", [False, True], ids=["single_doc", "packed"])
def test_selective_scan_ref_matches_naive_loop(grouped, packed):
    batch, seqlen, d_inner, d_state = 2, 11, 8, 4
    du = 4 if grouped else d_inner
    u = torch.randn(batch, seqlen, du, dtype=F64)
    delta = torch.randn(batch, seqlen, d_inner, dtype=F64)
    A = -torch.rand(d_inner, d_state, dtype=F64) - 0.1
    B = torch.randn(batch, seqlen, 1, d_state, dtype=F64)
    C = torch.randn(batch, seqlen, 2, d_state, dtype=F64)
    D, z, bias = torch.randn(d_inner, dtype=F64), torch.randn(batch, seqlen, d_inner, dtype=F64), torch.randn(d_inner, dtype=F64)
    h0 = torch.randn(batch, d_inner, d_state, dtype=F64)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5 + [2] * 2, [0] * 11], dtype=torch.int32) if packed else None
    y, final = selective_scan_ref(u, delta, A, B, C, D, z, bias, True, h0, seq_idx, return_final_state=True)
    y_naive, final_naive = naive_scan(u, delta, A, B, C, D, z, bias, h0, seq_idx, d_state)
    torch.testing.assert_close(y, y_naive, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_naive, rtol=1e-10, atol=1e-10)


def test_selective_scan_ref_long_sequence_crosses_chunks():
    """Chunk boundaries (256 tokens for this size) must carry the state exactly."""
    batch, seqlen, d_inner, d_state = 1, 600, 4, 2
    args = dict(
        u=torch.randn(batch, seqlen, d_inner, dtype=F64),
        delta=torch.randn(batch, seqlen, d_inner, dtype=F64) * 0.1,
        A=-torch.rand(d_inner, d_state, dtype=F64),
        B=torch.randn(batch, seqlen, 1, d_state, dtype=F64),
        C=torch.randn(batch, seqlen, 1, d_state, dtype=F64),
    )
    y, final = selective_scan_ref(**args, delta_softplus=True, return_final_state=True)
    y1, f1 = selective_scan_ref(**{k: (v[:, :300] if v.dim() > 2 else v) for k, v in args.items()}, delta_softplus=True, return_final_state=True)
    y2, f2 = selective_scan_ref(**{k: (v[:, 300:] if v.dim() > 2 else v) for k, v in args.items()}, delta_softplus=True, initial_state=f1, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f2, final, rtol=1e-12, atol=1e-12)


def test_causal_conv1d_ref_matches_naive_loop():
    batch, channels, seqlen, width = 2, 3, 9, 4
    x = torch.randn(batch, channels, seqlen, dtype=F64)
    w, b = torch.randn(channels, width, dtype=F64), torch.randn(channels, dtype=F64)
    init = torch.randn(batch, channels, width - 1, dtype=F64)
    out, final = causal_conv1d_ref(x, w, b, initial_states=init, return_final_states=True, activation="silu")
    full = torch.cat([init, x], 2)
    naive = torch.zeros_like(x)
    for bb in range(batch):
        for c in range(channels):
            for t in range(seqlen):
                naive[bb, c, t] = F.silu(b[c] + sum(w[c, k] * full[bb, c, t + k] for k in range(width)))
    torch.testing.assert_close(out, naive)
    torch.testing.assert_close(final, full[:, :, -(width - 1):])


def test_conv_update_ref_equals_fwd_token_by_token():
    batch, channels, seqlen, width = 2, 5, 7, 3
    x = torch.randn(batch, channels, seqlen, dtype=F64)
    w = torch.randn(channels, width, dtype=F64)
    out = causal_conv1d_ref(x, w, activation="silu")
    state = torch.zeros(batch, channels, width - 1, dtype=F64)
    steps = [causal_conv1d_update_ref(x[:, :, t], state, w, activation="silu") for t in range(seqlen)]
    torch.testing.assert_close(torch.stack(steps, -1), out)


def _mixer_inputs(batch=2, seqlen=13, d_inner=32, d_xb=16, d_state=8, dt_rank=4, width=4, repeat=True):
    conv_ch = d_inner if repeat else d_xb
    return dict(
        zxbc=torch.randn(batch, seqlen, 2 * d_inner + 2 * d_xb, dtype=F64),
        dt_low=torch.randn(batch, seqlen, dt_rank, dtype=F64),
        conv_weight=torch.randn(conv_ch, width, dtype=F64) * 0.5,
        conv_bias=torch.randn(conv_ch, dtype=F64) * 0.1,
        dt_proj_weight=torch.randn(d_inner, dt_rank, dtype=F64) * 0.5,
        dt_proj_bias=torch.randn(d_inner, dtype=F64) * 0.1 - 1.0,
        A_log=torch.log(torch.arange(1, d_state + 1, dtype=F64)).repeat(d_inner, 1),
        D_skip=torch.randn(d_inner, dtype=F64),
    ), dict(d_inner=d_inner, d_xb=d_xb, d_state=d_state, repeat_kv_before_conv=repeat)


def _mixer_naive(inp, dims):
    """The mixer written as its spec, materialising everything: repeat, conv, double bias, scan, gate."""
    d_inner, d_xb, d_state = dims["d_inner"], dims["d_xb"], dims["d_state"]
    z, x, B, C = torch.split(inp["zxbc"], [d_inner, d_xb, d_xb, d_inner], dim=-1)
    if dims["repeat_kv_before_conv"]:
        x = expand_grouped_channels(x, d_inner, d_state)
    u = causal_conv1d_ref(x.transpose(1, 2), inp["conv_weight"], inp["conv_bias"], activation="silu").transpose(1, 2)
    dt_pre = F.linear(inp["dt_low"], inp["dt_proj_weight"], inp["dt_proj_bias"])
    batch, seqlen = z.shape[:2]
    return naive_scan(
        u, dt_pre, -torch.exp(inp["A_log"]), B.reshape(batch, seqlen, -1, d_state), C.reshape(batch, seqlen, -1, d_state),
        inp["D_skip"], z, inp["dt_proj_bias"], None, None, d_state,
    )


@pytest.mark.parametrize("repeat", [True, False], ids=["repeat_before_conv", "conv_over_xb"])
def test_mixer_scan_ref_matches_spec_and_splits(repeat):
    inp, dims = _mixer_inputs(repeat=repeat)
    y, ssm, conv = mixer_scan_ref(**inp, **dims, return_final_states=True)
    y_naive, final_naive = _mixer_naive(inp, dims)
    torch.testing.assert_close(y, y_naive, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ssm.reshape(final_naive.shape), final_naive, rtol=1e-10, atol=1e-10)
    # split continuity: [a; b] == a then b from a's final states
    cut = 5
    first = {k: (v[:, :cut] if k in ("zxbc", "dt_low") else v) for k, v in inp.items()}
    second = {k: (v[:, cut:] if k in ("zxbc", "dt_low") else v) for k, v in inp.items()}
    ya, sa, ca = mixer_scan_ref(**first, **dims, return_final_states=True)
    yb, sb, cb = mixer_scan_ref(**second, **dims, initial_ssm_state=sa, initial_conv_state=ca, return_final_states=True)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sb, ssm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cb, conv)


@pytest.mark.parametrize("conv_layout", ["compact_xb", "d_inner"])
def test_mixer_step_ref_continues_prefill(conv_layout):
    inp, dims = _mixer_inputs(batch=3, seqlen=10)
    y_full = mixer_scan_ref(**inp, **dims)
    prefill = 6
    first = {k: (v[:, :prefill] if k in ("zxbc", "dt_low") else v) for k, v in inp.items()}
    _, ssm, conv = mixer_scan_ref(**first, **dims, return_final_states=True)
    if conv_layout == "d_inner":
        conv = expand_grouped_channels(conv.transpose(1, 2), dims["d_inner"], dims["d_state"]).transpose(1, 2)
    # Slots are permuted: sequence i lives in slot perm[i] of a larger cache; slot 4 is never touched.
    perm = torch.tensor([2, 0, 3], dtype=torch.int32)
    conv_cache = torch.full((5, conv.shape[1], 4), float("nan"), dtype=F64)
    conv_cache[perm.long(), :, 1:] = conv
    ssm_cache = torch.full((5, *ssm.shape[1:]), float("nan"), dtype=F64)
    ssm_cache[perm.long()] = ssm
    params = {k: v for k, v in inp.items() if k not in ("zxbc", "dt_low")}
    ys = []
    for t in range(prefill, 10):
        ys.append(mixer_step_ref(inp["zxbc"][:, t], inp["dt_low"][:, t], conv_cache, ssm_cache, perm, **params, **dims))
    torch.testing.assert_close(torch.stack(ys, 1), y_full[:, prefill:], rtol=1e-10, atol=1e-10)
    assert torch.isnan(ssm_cache[4]).all() and torch.isnan(conv_cache[4]).all()


def test_mixer_packed_equals_separate():
    inp, dims = _mixer_inputs(batch=1, seqlen=12)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7], dtype=torch.int32)
    y_packed, ssm_packed, conv_packed = mixer_scan_ref(**inp, **dims, seq_idx=seq_idx, return_final_states=True)
    pieces = []
    for lo, hi in ((0, 5), (5, 12)):
        part = {k: (v[:, lo:hi] if k in ("zxbc", "dt_low") else v) for k, v in inp.items()}
        pieces.append(mixer_scan_ref(**part, **dims, return_final_states=True))
    torch.testing.assert_close(y_packed, torch.cat([pieces[0][0], pieces[1][0]], 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ssm_packed, pieces[1][1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv_packed, pieces[1][2])
