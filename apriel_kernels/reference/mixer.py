"""Pure-PyTorch Apriel-H1 Mamba mixer core: from the in_proj output to the y that feeds out_proj.

Shapes (mixer.md sections 2-4): D = d_inner, X = d_xb, N = d_state, R = dt_rank, W = d_conv.
- zxbc: (b, L, 2D + 2X), the in_proj output split as z (D), x (X), B (X), C (D); may be a strided view.
- dt_low: (b, L, R), the dt_in_proj output.
- conv_weight: (Cc, W), conv_bias: (Cc,) or None, with Cc = D when repeat_kv_before_conv else X.
- dt_proj_weight: (D, R), dt_proj_bias: (D,). The bias is applied twice (Linear + delta_bias).
- A_log: (D, N) fp32; D_skip: (D,) fp32.
- ssm state: (b, D/N, N, N) fp32 = (head, channel-in-head, state), identical in memory to (b, D, N).
- conv state: (b, Cs, S) pre-conv x, S >= W - 1, oldest first. Cs = X is the compact layout (exact for
  both repeat settings, because the conv input of a repeated channel is its source channel); Cs = D is the
  layout of the reference HF checkpoints (only with repeat_kv_before_conv).

Packed sequences: seq_idx (b, L) int, non-decreasing; SSM state and conv window reset at each document
start (the initial states belong to the document of token 0).
"""
from __future__ import annotations

import torch

from .conv1d import causal_conv1d_ref
from .selective_scan import expand_grouped_channels, selective_scan_ref


def split_zxbc(zxbc: torch.Tensor, d_inner: int, d_xb: int):
    """Views z (.., D), x (.., X), B (.., X), C (.., D) of the in_proj output (no copies)."""
    z, x, B, C = torch.split(zxbc, [d_inner, d_xb, d_xb, d_inner], dim=-1)
    return z, x, B, C


def compact_conv_state(conv_state: torch.Tensor, d_xb: int, d_state: int) -> torch.Tensor:
    """(.., D, S) D-channel conv state of a repeat-before-conv mixer -> the exact (.., X, S) one."""
    d_inner = conv_state.shape[-2]
    if d_inner == d_xb:
        return conv_state
    r = d_inner // d_xb
    # channel c of the source group g, offset n, is stored at D-channel g * N * r + n (first copy).
    src = torch.arange(d_xb, device=conv_state.device)
    first_copy = (src // d_state) * d_state * r + src % d_state
    return conv_state.index_select(-2, first_copy)


def mixer_scan_ref(
    zxbc: torch.Tensor,
    dt_low: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor,
    A_log: torch.Tensor,
    D_skip: torch.Tensor,
    *,
    d_inner: int,
    d_xb: int,
    d_state: int,
    repeat_kv_before_conv: bool = True,
    initial_ssm_state: torch.Tensor | None = None,
    initial_conv_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_states: bool = False,
    compute_dtype: torch.dtype | None = None,
):
    """Fused mixer forward (mixer.md section 3, steps 2-6 without the projections).

    Returns y (b, L, D) in zxbc's dtype [, final_ssm_state (b, D/N, N, N) fp32-or-compute dtype,
    final_conv_state (b, X, W-1) in zxbc's dtype].
    """
    batch, seqlen, _ = zxbc.shape
    width = conv_weight.shape[-1]
    f = compute_dtype or (torch.float64 if zxbc.dtype == torch.float64 else torch.float32)
    z, x, B, C = split_zxbc(zxbc, d_inner, d_xb)
    conv_w = conv_weight.reshape(conv_weight.shape[0], width).to(f)
    conv_b = conv_bias.to(f) if conv_bias is not None else None
    init_conv = None
    if initial_conv_state is not None:
        init_conv = compact_conv_state(initial_conv_state, d_xb, d_state)[..., -(width - 1):].to(f)
    x_f = x.to(f)
    if repeat_kv_before_conv:
        x_conv_in = expand_grouped_channels(x_f, d_inner, d_state)
        init_conv_in = expand_grouped_channels(init_conv.transpose(1, 2), d_inner, d_state).transpose(1, 2) if init_conv is not None else None
    else:
        x_conv_in, init_conv_in = x_f, init_conv
    u = causal_conv1d_ref(
        x_conv_in.transpose(1, 2), conv_w, conv_b, seq_idx=seq_idx, initial_states=init_conv_in, activation="silu"
    ).transpose(1, 2)  # (b, L, Cc)
    # The dt_proj Linear includes its bias; the scan adds it again as delta_bias (mixer.md 3.4).
    dt_pre = dt_low.to(f) @ dt_proj_weight.to(f).t() + dt_proj_bias.to(f)
    A = -torch.exp(A_log.to(f))
    n_b_groups = d_xb // d_state
    init_ssm = initial_ssm_state.reshape(batch, d_inner, d_state) if initial_ssm_state is not None else None
    y, h = selective_scan_ref(
        u,
        dt_pre,
        A,
        B.reshape(batch, seqlen, n_b_groups, d_state),
        C.reshape(batch, seqlen, d_inner // d_state, d_state),
        D=D_skip,
        z=z,
        delta_bias=dt_proj_bias,
        delta_softplus=True,
        initial_state=init_ssm,
        seq_idx=seq_idx,
        return_final_state=True,
        compute_dtype=f,
    )
    y = y.to(zxbc.dtype)
    if not return_final_states:
        return y
    # Final conv state: the last W-1 pre-conv x inputs at X channels (window of the last document).
    _, final_conv = causal_conv1d_ref(
        x_f.transpose(1, 2),
        torch.zeros(d_xb, width, dtype=f, device=x.device),
        seq_idx=seq_idx,
        initial_states=init_conv,
        return_final_states=True,
    )
    final_ssm = h.reshape(batch, d_inner // d_state, d_state, d_state)
    return y, final_ssm, final_conv.to(zxbc.dtype)


def mixer_step_ref(
    zxbc: torch.Tensor,
    dt_low: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    slot_idx: torch.Tensor | None,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor,
    A_log: torch.Tensor,
    D_skip: torch.Tensor,
    *,
    d_inner: int,
    d_xb: int,
    d_state: int,
    repeat_kv_before_conv: bool = True,
) -> torch.Tensor:
    """Advance q tokens per sequence (mixer.md section 4); conv_state and ssm_state update IN PLACE.

    zxbc: (b, 2D+2X) or (b, q, 2D+2X); dt_low: (b, R) or (b, q, R);
    conv_state: (slots, Cs, S), Cs in {X, D}, S >= W-1; ssm_state: (slots, D/N, N, N) fp32 or bf16
    (math in fp32 or float64, rounded on store); slot_idx: (b,) int32, -1 = padding row (y = 0, no state
    I/O), None = row i uses slot i. Returns y with zxbc's leading shape and D channels, zxbc's dtype.
    """
    single = zxbc.dim() == 2
    if single:
        zxbc, dt_low = zxbc.unsqueeze(1), dt_low.unsqueeze(1)
    batch, q, _ = zxbc.shape
    width = conv_weight.shape[-1]
    f = torch.float64 if zxbc.dtype == torch.float64 else torch.float32
    slots = torch.arange(batch, device=zxbc.device) if slot_idx is None else slot_idx.long()
    valid = slots >= 0
    safe = torch.where(valid, slots, torch.zeros_like(slots))
    n_slots_channels = conv_state.shape[1]
    conv_in = conv_state[safe]
    if n_slots_channels != d_xb:
        conv_in = compact_conv_state(conv_in, d_xb, d_state)
    init_conv = conv_in[..., -(width - 1):]
    init_ssm = ssm_state[safe].to(f)
    y, final_ssm, final_conv = mixer_scan_ref(
        zxbc,
        dt_low,
        conv_weight,
        conv_bias,
        dt_proj_weight,
        dt_proj_bias,
        A_log,
        D_skip,
        d_inner=d_inner,
        d_xb=d_xb,
        d_state=d_state,
        repeat_kv_before_conv=repeat_kv_before_conv,
        initial_ssm_state=init_ssm,
        initial_conv_state=init_conv,
        return_final_states=True,
        compute_dtype=f,
    )
    y = y * valid.view(batch, 1, 1).to(y.dtype)
    # New conv window: shift the stored S entries by q and append the new inputs.
    _, x, _, _ = split_zxbc(zxbc, d_inner, d_xb)
    state_len = conv_state.shape[2]
    stored = conv_state[safe]
    new_inputs = x.transpose(1, 2).to(conv_state.dtype)  # (b, X, q)
    if n_slots_channels != d_xb:
        new_inputs = expand_grouped_channels(new_inputs.transpose(1, 2), d_inner, d_state).transpose(1, 2)
    new_window = torch.cat([stored, new_inputs], dim=2)[..., -state_len:]
    if bool(valid.any()):
        idx = slots[valid]
        conv_state[idx] = new_window[valid]
        ssm_state[idx] = final_ssm[valid].to(ssm_state.dtype)
    return y.squeeze(1) if single else y
