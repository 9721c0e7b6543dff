"""Pure-PyTorch causal depthwise conv1d: the semantics every conv kernel of the project must match.

Conventions (same as the causal-conv1d package, so code can switch imports):
- x is (batch, channels, seqlen). A token-major activation (batch, seqlen, channels) is passed as its
  transpose, x.stride(1) == 1; the reference does not care about strides, kernels do.
- weight is (channels, width), bias (channels,).
- A conv state holds the last `state_len >= width - 1` pre-conv inputs of a channel, oldest first:
  (batch_or_slots, channels, state_len). Only its last width - 1 entries are read.
- Packed sequences: seq_idx (batch, seqlen) int32, non-decreasing along the sequence; a tap that reaches
  into an earlier document reads zero (the window resets at document starts). The initial state belongs
  to the document of token 0; the final state is the window of the last document.

All functions compute in the input dtype (pass float64 for the ground truth) and are vectorised over
channels and tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _apply_activation(out: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation in ("silu", "swish"):
        return F.silu(out)
    if activation is None:
        return out
    raise ValueError(f"activation: expected None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
):
    """out[b,c,t] = act(bias[c] + sum_k weight[c,k] * x[b,c,t-(W-1)+k]).

    x: (batch, channels, seqlen); weight: (channels, W); bias: (channels,) or None;
    seq_idx: (batch, seqlen) int or None; initial_states: (batch, channels, W-1) or None.
    Returns out (batch, channels, seqlen) [, final_states (batch, channels, W-1)].
    """
    batch, channels, seqlen = x.shape
    width = weight.shape[1]
    halo = width - 1
    dtype = x.dtype
    if initial_states is None:
        initial_states = x.new_zeros(batch, channels, halo)
    padded = torch.cat([initial_states.to(dtype), x], dim=2)  # (b, c, halo + L)
    out = torch.zeros_like(x)
    if seq_idx is not None:
        # Document id of each padded position: the halo belongs to the document of token 0.
        seq_padded = torch.cat([seq_idx[:, :1].expand(batch, halo), seq_idx], dim=1)
    for k in range(width):
        tap = padded[:, :, k : k + seqlen]
        if seq_idx is not None:
            same_doc = (seq_padded[:, k : k + seqlen] == seq_idx).unsqueeze(1)
            tap = tap * same_doc.to(dtype)
        out = out + weight[:, k].to(dtype).view(1, channels, 1) * tap
    if bias is not None:
        out = out + bias.to(dtype).view(1, channels, 1)
    out = _apply_activation(out, activation)
    if not return_final_states:
        return out
    final = padded[:, :, seqlen:]  # last W-1 inputs, initial-state padded when L < W-1
    if seq_idx is not None:
        last_doc = seq_idx[:, -1:]
        keep = (seq_padded[:, seqlen:] == last_doc).unsqueeze(1)
        final = final * keep.to(dtype)
    return out, final.clone()


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    conv_state_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advance cached conv windows by q new tokens; conv_state is updated IN PLACE.

    x: (batch, channels) or (batch, channels, q); conv_state: (slots, channels, S) with S >= W-1;
    conv_state_indices: (batch,) int32 slot per row, -1 = padding row (output 0, no state I/O);
    None means row i uses slot i. Returns out with the shape of x.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    batch, channels, q = x.shape
    width = weight.shape[1]
    halo = width - 1
    state_len = conv_state.shape[2]
    if conv_state_indices is None:
        slots = torch.arange(batch, device=x.device)
    else:
        slots = conv_state_indices.long()
    valid = slots >= 0
    safe_slots = torch.where(valid, slots, torch.zeros_like(slots))
    state = conv_state[safe_slots].to(x.dtype)  # (b, c, S)
    window = torch.cat([state, x], dim=2)  # (b, c, S + q)
    out = torch.zeros_like(x)
    for k in range(width):
        start = state_len - halo + k
        out = out + weight[:, k].to(x.dtype).view(1, channels, 1) * window[:, :, start : start + q]
    if bias is not None:
        out = out + bias.to(x.dtype).view(1, channels, 1)
    out = _apply_activation(out, activation)
    out = out * valid.view(batch, 1, 1).to(out.dtype)
    new_state = window[:, :, q:].to(conv_state.dtype)
    if bool(valid.any()):
        conv_state[slots[valid]] = new_state[valid]
    return out.squeeze(-1) if squeeze else out
