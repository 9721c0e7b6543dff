"""Argument checks shared by the mixer scan and step ops."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _validate as V


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 SSM state for every activation dtype (fp64 for the float64 reference runs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_mixer_params(conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D, device, sizes,
                        repeat_kv_before_conv):
    params = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    conv_channels = sizes["d_inner"] if repeat_kv_before_conv else sizes["d_xb"]
    V.check_tensor("conv_weight", conv_weight, (conv_channels, None), params, device=device)
    if not 2 <= conv_weight.shape[1] <= 4:
        raise ValueError(f"conv_weight: expected width (dim 1) in 2..4, got {conv_weight.shape[1]}")
    V.check_tensor("conv_bias", conv_bias, (conv_channels,), params, device=device, optional=True)
    V.check_tensor("dt_proj_weight", dt_proj_weight, ("d_inner", "dt_rank"), params, device=device, sizes=sizes)
    V.check_tensor("dt_proj_bias", dt_proj_bias, ("d_inner",), params, device=device, sizes=sizes)
    V.check_tensor("A_log", A_log, ("d_inner", "d_state"), (torch.float32, torch.float64), device=device, sizes=sizes)
    V.check_tensor("D", D, ("d_inner",), (torch.float32, torch.float64), device=device, sizes=sizes)


def check_dims(d_inner: int, d_xb: int, d_state: int) -> None:
    if d_state <= 0:
        raise ValueError(f"d_state: expected a positive int, got {d_state}")
    V.check_positive_multiple("d_xb", d_xb, d_state, "d_state")
    V.check_positive_multiple("d_inner", d_inner, d_xb, "d_xb")


def conv_weight_2d(conv_weight: Tensor) -> Tensor:
    if conv_weight.dim() == 3 and conv_weight.shape[1] == 1:
        return conv_weight.squeeze(1)  # nn.Conv1d layout (C, 1, W)
    return conv_weight


