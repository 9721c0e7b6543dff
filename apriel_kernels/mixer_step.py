"""The fused Apriel-H1 one-token (or q-token) decode step with slot-indexed caches.

    mixer_step(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight,
               dt_proj_bias, A_log, D, *, d_inner, d_xb, d_state, repeat_kv_before_conv=True)
        zxbc: (b, 2D+2X) or (b, q, 2D+2X); dt_low: (b, R) or (b, q, R); conv_state: (slots, X or D, S)
        and ssm_state: (slots, D/N, N, N) fp32|bf16 are updated IN PLACE; slot_idx: (b,) int32, -1 = padding.
        Returns y (b, [q,] D) in zxbc's dtype (0 for padding rows).

Semantics: mixer.md sections 3-4 and apriel_kernels.reference.mixer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validate as V
from ._ext import cuda_kernel
from ._mixer_common import check_dims, check_mixer_params, conv_weight_2d
from .reference.mixer import mixer_step_ref

__all__ = ["mixer_step", "mixer_step_ref"]


# ------------------------------------------------------------------------------------------------- step
@torch.library.custom_op("apriel::mixer_step", mutates_args=("conv_state", "ssm_state"))
def mixer_step_op(
    zxbc: Tensor,
    dt_low: Tensor,
    conv_state: Tensor,
    ssm_state: Tensor,
    slot_idx: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    dt_proj_weight: Tensor,
    dt_proj_bias: Tensor,
    A_log: Tensor,
    D: Tensor,
    d_inner: int,
    d_xb: int,
    d_state: int,
    repeat_kv_before_conv: bool,
) -> Tensor:
    """zxbc: (b, q, 2D+2X). Returns y (b, q, D); the caches are updated in place."""
    if zxbc.is_cuda:
        kernel = cuda_kernel("mixer_step")
        if kernel is not None:
            return kernel(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight,
                          dt_proj_bias, A_log, D, d_inner, d_xb, d_state, repeat_kv_before_conv)
    y = mixer_step_ref(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight,
                       dt_proj_bias, A_log, D, d_inner=d_inner, d_xb=d_xb, d_state=d_state,
                       repeat_kv_before_conv=repeat_kv_before_conv)
    return y.contiguous()


@mixer_step_op.register_fake
def _(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log,
      D, d_inner, d_xb, d_state, repeat_kv_before_conv):
    return zxbc.new_empty(zxbc.shape[0], zxbc.shape[1], d_inner)


def mixer_step(
    zxbc: Tensor,
    dt_low: Tensor,
    conv_state: Tensor,
    ssm_state: Tensor,
    slot_idx: Tensor | None,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    dt_proj_weight: Tensor,
    dt_proj_bias: Tensor,
    A_log: Tensor,
    D: Tensor,
    *,
    d_inner: int,
    d_xb: int,
    d_state: int,
    repeat_kv_before_conv: bool = True,
) -> Tensor:
    """One (or q) decode token(s) per sequence through the mixer core; caches updated in place."""
    check_dims(d_inner, d_xb, d_state)
    single = zxbc is not None and zxbc.dim() == 2
    zxbc3 = zxbc.unsqueeze(1) if single else zxbc
    dt3 = dt_low.unsqueeze(1) if single and dt_low is not None else dt_low
    sizes = V.Sizes(d_inner=d_inner, d_xb=d_xb, d_state=d_state, zxbc_width=2 * d_inner + 2 * d_xb)
    V.check_tensor("zxbc", zxbc3, ("batch", "q", "zxbc_width"), V.FLOAT_DTYPES, sizes=sizes, last_dim_contiguous=True)
    dev = zxbc.device
    V.check_tensor("dt_low", dt3, ("batch", "q", "dt_rank"), (zxbc.dtype,), device=dev, sizes=sizes, last_dim_contiguous=True)
    conv_weight = conv_weight_2d(conv_weight)
    check_mixer_params(conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D, dev, sizes, repeat_kv_before_conv)
    V.check_tensor("conv_state", conv_state, ("slots", None, None), V.FLOAT_DTYPES, device=dev, sizes=sizes)
    allowed = (d_xb, d_inner) if repeat_kv_before_conv else (d_xb,)
    if conv_state.shape[1] not in allowed or conv_state.shape[2] < conv_weight.shape[1] - 1:
        raise ValueError(f"conv_state: expected (slots, one of {allowed}, >= {conv_weight.shape[1] - 1}), got {tuple(conv_state.shape)}")
    V.check_tensor("ssm_state", ssm_state, ("slots", d_inner // d_state, d_state, d_state),
                   (torch.float32, torch.bfloat16, torch.float64), device=dev, sizes=sizes)
    if slot_idx is None:
        if ssm_state.shape[0] < zxbc3.shape[0]:
            raise ValueError(f"ssm_state: expected at least batch = {zxbc3.shape[0]} slots when slot_idx is None, got {ssm_state.shape[0]}")
    else:
        V.check_tensor("slot_idx", slot_idx, ("batch",), V.INDEX_DTYPES, device=dev, sizes=sizes)
        V.check_index_range("slot_idx", slot_idx, ssm_state.shape[0])
    y = mixer_step_op(zxbc3, dt3, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight,
                      dt_proj_bias, A_log, D, d_inner, d_xb, d_state, repeat_kv_before_conv)
    return y.squeeze(1) if single else y
