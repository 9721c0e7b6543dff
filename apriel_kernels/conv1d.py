"""Causal depthwise conv1d ops (torch.library custom ops), API-compatible with the causal-conv1d package.

    causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None)
        x: (batch, dim, seqlen) bf16|fp16|fp32|fp64, channel-major (stride(2) == 1) or token-major
           (stride(1) == 1, i.e. the transpose of a (batch, seqlen, dim) tensor, e.g. a column slice of
           an in_proj output); weight: (dim, width) width in 2..4; bias: (dim,);
        seq_idx: (batch, seqlen) int32, packed documents; initial_states: (batch, dim, width-1).
        Returns out (batch, dim, seqlen) in x's layout [, final_states (batch, dim, width-1)].
        Differentiable w.r.t. x, weight, bias and initial_states.
    causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, conv_state_indices=None)
        x: (batch, dim) or (batch, dim, q); conv_state: (slots, dim, state_len >= width-1), updated IN
        PLACE; conv_state_indices: (batch,) int32 slot of each row, -1 = padding row (out 0, no state I/O).

Dispatch: CPU runs the reference (apriel_kernels.reference.conv1d); CUDA runs torch.ops.apriel_C.* when
the extension is built (see apriel_kernels._ext for what happens when it is not).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validate as V
from ._ext import cuda_kernel
from .reference.conv1d import causal_conv1d_ref, causal_conv1d_update_ref

__all__ = ["causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref"]


def _empty_like_layout(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """(b, C, L) output with x's memory layout: token-major when x is, else contiguous channel-major."""
    batch, channels, seqlen = x.shape
    dtype = dtype or x.dtype
    if x.stride(1) == 1 and channels > 1:
        return torch.empty(batch, seqlen, channels, dtype=dtype, device=x.device).transpose(1, 2)
    return torch.empty(batch, channels, seqlen, dtype=dtype, device=x.device)


def _activation_flag(activation: str | None) -> bool:
    V.check_choice("activation", activation, [None, "silu", "swish"])
    return activation is not None


# ---------------------------------------------------------------------------------------------- forward
@torch.library.custom_op("apriel::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    seq_idx: Optional[Tensor],
    initial_states: Optional[Tensor],
    return_final_states: bool,
    silu: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (out in x's layout, final_states (b, dim, width-1) or an empty tensor)."""
    if x.is_cuda:
        kernel = cuda_kernel("causal_conv1d_fwd")
        if kernel is not None:
            return kernel(x, weight, bias, seq_idx, initial_states, return_final_states, silu)
    result = causal_conv1d_ref(
        x, weight, bias, seq_idx, initial_states, return_final_states, "silu" if silu else None
    )
    out = _empty_like_layout(x)
    if return_final_states:
        ref_out, final = result
        out.copy_(ref_out)
        return out, final.to(x.dtype).contiguous()
    out.copy_(result)
    return out, x.new_empty(0)


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, return_final_states, silu):
    out = _empty_like_layout(x)
    if return_final_states:
        return out, x.new_empty(x.shape[0], x.shape[1], weight.shape[1] - 1)
    return out, x.new_empty(0)


# --------------------------------------------------------------------------------------------- backward
@torch.library.custom_op("apriel::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    seq_idx: Optional[Tensor],
    initial_states: Optional[Tensor],
    dout: Tensor,
    dfinal_states: Optional[Tensor],
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx in x's layout, dweight (dim, width) fp32, dbias (dim,) fp32 or empty,
    dinitial_states (b, dim, width-1) in x's dtype or empty)."""
    if x.is_cuda:
        kernel = cuda_kernel("causal_conv1d_bwd")
        if kernel is not None:
            return kernel(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu)
    dx, dw, db, dinit = _conv_bwd_torch(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu)
    dx_out = _empty_like_layout(x)
    dx_out.copy_(dx)
    return (
        dx_out,
        dw.float(),
        db.float() if bias is not None else x.new_empty(0, dtype=torch.float32),
        dinit.to(x.dtype).contiguous() if initial_states is not None else x.new_empty(0),
    )


def _conv_bwd_torch(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu):
    """The backward written out in torch ops, in x's precision (exact in float64): the CPU kernel.

    (A torch.func.vjp of the reference would do, but functorch wrappers break opcheck's schema test.)
    Returns dx (b, C, L), dweight (C, W), dbias (C,), dinitial_states (b, C, W-1) in x's dtype.
    """
    batch, channels, seqlen = x.shape
    width = weight.shape[1]
    halo = width - 1
    dtype = x.dtype
    w = weight.to(dtype)
    init = initial_states.to(dtype) if initial_states is not None else x.new_zeros(batch, channels, halo)
    padded = torch.cat([init, x], dim=2)  # positions -halo .. L-1
    if seq_idx is not None:
        seq_padded = torch.cat([seq_idx[:, :1].expand(batch, halo), seq_idx], dim=1)
    taps = []  # taps[k][b, c, t] = input at t - halo + k, zero across a document boundary
    for k in range(width):
        tap = padded[:, :, k : k + seqlen]
        if seq_idx is not None:
            tap = tap * (seq_padded[:, k : k + seqlen] == seq_idx).unsqueeze(1).to(dtype)
        taps.append(tap)
    pre = sum(w[:, k].view(1, channels, 1) * taps[k] for k in range(width))
    if bias is not None:
        pre = pre + bias.to(dtype).view(1, channels, 1)
    dpre = dout.to(dtype)
    if silu:
        sig = torch.sigmoid(pre)
        dpre = dpre * sig * (1 + pre * (1 - sig))
    dpadded = torch.zeros_like(padded)
    for k in range(width):
        contrib = w[:, k].view(1, channels, 1) * dpre
        if seq_idx is not None:
            contrib = contrib * (seq_padded[:, k : k + seqlen] == seq_idx).unsqueeze(1).to(dtype)
        dpadded[:, :, k : k + seqlen] += contrib
    if dfinal_states is not None and dfinal_states.numel() > 0:
        dfin = dfinal_states.to(dtype)
        if seq_idx is not None:
            dfin = dfin * (seq_padded[:, seqlen:] == seq_idx[:, -1:]).unsqueeze(1).to(dtype)
        dpadded[:, :, seqlen:] += dfin
    dweight = torch.stack([(dpre * taps[k]).sum(dim=(0, 2)) for k in range(width)], dim=1)
    dbias = dpre.sum(dim=(0, 2))
    return dpadded[:, :, halo:], dweight, dbias, dpadded[:, :, :halo]


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu):
    return (
        _empty_like_layout(x),
        weight.new_empty(weight.shape, dtype=torch.float32),
        weight.new_empty(bias.shape if bias is not None else (0,), dtype=torch.float32),
        x.new_empty(initial_states.shape if initial_states is not None else (0,)),
    )


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, return_final_states, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.silu = silu
    ctx.return_final_states = return_final_states


def _fwd_backward(ctx, dout, dfinal_states):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    if not ctx.return_final_states:
        dfinal_states = None
    dx, dweight, dbias, dinit = causal_conv1d_bwd(
        x, weight, bias, seq_idx, initial_states, dout, dfinal_states, ctx.silu
    )
    return (
        dx,
        dweight.to(weight.dtype),
        dbias.to(bias.dtype) if bias is not None else None,
        None,
        dinit if initial_states is not None else None,
        None,
        None,
    )


causal_conv1d_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ------------------------------------------------------------------------------------------ update step
@torch.library.custom_op("apriel::causal_conv1d_update", mutates_args=("conv_state",))
def causal_conv1d_update_op(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    silu: bool,
    conv_state_indices: Optional[Tensor],
) -> Tensor:
    """x: (b, dim, q). Returns out (b, dim, q); conv_state updated in place."""
    if x.is_cuda:
        kernel = cuda_kernel("causal_conv1d_update")
        if kernel is not None:
            return kernel(x, conv_state, weight, bias, silu, conv_state_indices)
    out = causal_conv1d_update_ref(x, conv_state, weight, bias, "silu" if silu else None, conv_state_indices)
    return out.contiguous()


@causal_conv1d_update_op.register_fake
def _(x, conv_state, weight, bias, silu, conv_state_indices):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------- public functions
def _check_conv_args(x, weight, bias, sizes: V.Sizes) -> None:
    V.check_tensor("x", x, ("batch", "dim", "seqlen"), V.FLOAT_DTYPES, sizes=sizes)
    if x.stride(1) != 1 and x.stride(2) != 1 and x.shape[1] > 1 and x.shape[2] > 1:
        raise ValueError(
            "x: expected channel-major (stride(2) == 1) or token-major (stride(1) == 1) layout, "
            f"got strides {x.stride()}"
        )
    V.check_tensor("weight", weight, ("dim", None), V.FLOAT_DTYPES, device=x.device, sizes=sizes)
    if not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"weight: expected width (dim 1) in 2..4, got {weight.shape[1]}")
    V.check_tensor("bias", bias, ("dim",), V.FLOAT_DTYPES, device=x.device, sizes=sizes, optional=True)


def causal_conv1d_fn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: Tensor | None = None,
    activation: str | None = None,
):
    """Causal depthwise conv1d over (batch, dim, seqlen); see the module docstring for the contract."""
    sizes = V.Sizes()
    if weight is not None and weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight.squeeze(1)  # accept nn.Conv1d's (dim, 1, width)
    _check_conv_args(x, weight, bias, sizes)
    silu = _activation_flag(activation)
    V.check_tensor("seq_idx", seq_idx, ("batch", "seqlen"), V.INDEX_DTYPES, device=x.device, sizes=sizes, optional=True)
    halo = weight.shape[1] - 1
    V.check_tensor(
        "initial_states", initial_states, ("batch", "dim", halo), V.FLOAT_DTYPES, device=x.device, sizes=sizes,
        optional=True,
    )
    want_final = return_final_states or final_states_out is not None
    out, final = causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, want_final, silu)
    if not want_final:
        return out
    if final_states_out is not None:
        V.check_tensor("final_states_out", final_states_out, ("batch", "dim", halo), sizes=sizes)
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    cache_seqlens: Tensor | None = None,
    conv_state_indices: Tensor | None = None,
) -> Tensor:
    """One-token (or q-token) conv step over cached windows; conv_state is updated in place."""
    if cache_seqlens is not None:
        raise NotImplementedError("cache_seqlens (circular conv buffers): not supported; pass None")
    sizes = V.Sizes()
    if weight is not None and weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight.squeeze(1)
    squeeze = x is not None and x.dim() == 2
    x3 = x.unsqueeze(-1) if squeeze else x
    V.check_tensor("x", x3, ("batch", "dim", None), V.FLOAT_DTYPES, sizes=sizes)
    V.check_tensor("weight", weight, ("dim", None), V.FLOAT_DTYPES, device=x.device, sizes=sizes)
    if not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"weight: expected width (dim 1) in 2..4, got {weight.shape[1]}")
    V.check_tensor("bias", bias, ("dim",), V.FLOAT_DTYPES, device=x.device, sizes=sizes, optional=True)
    V.check_tensor("conv_state", conv_state, ("slots", "dim", None), V.FLOAT_DTYPES, device=x.device, sizes=sizes)
    if conv_state.shape[2] < weight.shape[1] - 1:
        raise ValueError(
            f"conv_state: expected state_len (dim 2) >= width - 1 = {weight.shape[1] - 1}, got {conv_state.shape[2]}"
        )
    if conv_state_indices is None:
        if conv_state.shape[0] < x.shape[0]:
            raise ValueError(
                f"conv_state: expected at least batch = {x.shape[0]} slots when conv_state_indices is None, "
                f"got {conv_state.shape[0]}"
            )
    else:
        V.check_tensor("conv_state_indices", conv_state_indices, ("batch",), V.INDEX_DTYPES, device=x.device,
                       sizes=sizes)
        # Reading the index range syncs the device, which CUDA-graph capture forbids: skipped while capturing
        # (the kernel treats an out-of-range slot like padding rather than touching memory out of bounds).
        if not (conv_state_indices.is_cuda and torch.cuda.is_current_stream_capturing()):
            V.check_index_range("conv_state_indices", conv_state_indices, conv_state.shape[0])
    silu = _activation_flag(activation)
    out = causal_conv1d_update_op(x3, conv_state, weight, bias, silu, conv_state_indices)
    return out.squeeze(-1) if squeeze else out
