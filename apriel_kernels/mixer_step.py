"""The fused Apriel-H1 one-token (or q-token) decode step with slot-indexed caches.

    mixer_step(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight,
               dt_proj_bias, A_log, D, *, d_inner, d_xb, d_state, repeat_kv_before_conv=True, out=None)
        zxbc: (b, 2D+2X) or (b, q, 2D+2X) fp16|bf16|fp32 (fp64: reference only), the in_proj output
              (a strided view is fine; the last dim must have unit stride);
        dt_low: (b, R) or (b, q, R), zxbc's dtype;
        conv_state: (slots, X or D, S >= W-1), pre-conv x, oldest first; UPDATED IN PLACE;
        ssm_state: (slots, D/N, N, N) fp32 (default) or bf16 (fp32 math, rounded on store); UPDATED IN PLACE;
        slot_idx: (b,) int32 cache row of each sequence, -1 = padding row (y = 0, no state I/O), or None
                  (row i uses slot i);
        conv_weight: (Cc, W) or (Cc, 1, W), Cc = D if repeat_kv_before_conv else X; conv_bias: (Cc,) or None;
        dt_proj_weight: (D, R); dt_proj_bias: (D,) (applied twice, mixer.md 3.4); A_log: (D, N); D: (D,);
        out: optional y buffer with y's shape and zxbc's dtype (nothing is allocated: CUDA-graph friendly).
        Returns y (b, [q,] D) in zxbc's dtype. q tokens in one call == q single-token calls.

Ops: apriel::mixer_step (returns y) and apriel::mixer_step_out (writes y into out); both mark the caches
as mutated, so torch.compile re-inplaces them instead of cloning. CPU runs the reference
(apriel_kernels.reference.mixer.mixer_step_ref); CUDA runs torch.ops.apriel_C.mixer_step[_out] (fp64 on
CUDA runs the reference: it is the ground-truth mode; the kernel needs d_state = 16 and d_inner / d_xb
dividing 16, see check_kernel_support). Under CUDA-graph capture the slot range check
(a host sync) is skipped; the kernel treats an out-of-range slot as padding rather than write out of bounds.
Kernel variants, read by the extension at every call (benchmark A/B; docs/notes/step.md): the default is
kernel v2; APRIEL_STEP_KERNEL=v1 runs the first kernel; APRIEL_STEP_SEQ_PER_THREAD in {1, 2, 4} forces the
sequences per thread; APRIEL_STEP_PDL=1 launches v2 with programmatic dependent launch (sm_90; only when
the layer parameters are not written by the kernel launched just before the step, as in a decode graph).

Semantics: mixer.md section 4 and apriel_kernels.reference.mixer.
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

_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def check_kernel_support(d_inner: int, d_xb: int, d_state: int) -> None:
    """The CUDA kernel's shape limits (the reference has none): 16 states per channel (one thread owns
    them), r = d_inner / d_xb dividing 16 (a 256-thread block holds whole x/B groups). Raises ValueError.
    Checked here, before the extension is called, so the error is a Python one naming the argument."""
    if d_state != 16:
        raise ValueError(f"d_state: the CUDA step kernel supports d_state = 16, got {d_state}")
    if 16 % (d_inner // d_xb) != 0:
        raise ValueError(f"d_inner / d_xb: expected a divisor of 16 for the CUDA step kernel, got {d_inner // d_xb}")


def _cuda_step_kernel(zxbc: Tensor, name: str):
    """The compiled kernel for a CUDA call, or None when the reference runs (fp64, or allowed fallback)."""
    if not zxbc.is_cuda or zxbc.dtype == torch.float64:
        return None
    return cuda_kernel(name)


def _reference(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias,
               A_log, D, d_inner, d_xb, d_state, repeat_kv_before_conv) -> Tensor:
    return mixer_step_ref(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight,
                          dt_proj_bias, A_log, D, d_inner=d_inner, d_xb=d_xb, d_state=d_state,
                          repeat_kv_before_conv=repeat_kv_before_conv)


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
    kernel = _cuda_step_kernel(zxbc, "mixer_step")
    if kernel is not None:
        return kernel(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight,
                      dt_proj_bias, A_log, D, d_inner, d_xb, d_state, repeat_kv_before_conv)
    y = _reference(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight,
                   dt_proj_bias, A_log, D, d_inner, d_xb, d_state, repeat_kv_before_conv)
    return y.contiguous()


@mixer_step_op.register_fake
def _(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log,
      D, d_inner, d_xb, d_state, repeat_kv_before_conv):
    return zxbc.new_empty(zxbc.shape[0], zxbc.shape[1], d_inner)


# --------------------------------------------------------------------------------------- step, out= form
@torch.library.custom_op("apriel::mixer_step_out", mutates_args=("conv_state", "ssm_state", "out"))
def mixer_step_out_op(
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
    out: Tensor,
) -> None:
    """Like apriel::mixer_step but writes y (b, q, D) into `out`; allocates nothing on the CUDA path."""
    kernel = _cuda_step_kernel(zxbc, "mixer_step_out")
    if kernel is not None:
        kernel(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias,
               A_log, D, d_inner, d_xb, d_state, repeat_kv_before_conv, out)
        return
    out.copy_(_reference(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight,
                         dt_proj_bias, A_log, D, d_inner, d_xb, d_state, repeat_kv_before_conv))


@mixer_step_out_op.register_fake
def _(zxbc, dt_low, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log,
      D, d_inner, d_xb, d_state, repeat_kv_before_conv, out):
    return None


# ------------------------------------------------------------------------------------------- public API
def _check_slots(slot_idx: Tensor | None, ssm_state: Tensor, conv_state: Tensor, batch: int, sizes: V.Sizes) -> None:
    if conv_state.shape[0] != ssm_state.shape[0]:
        raise ValueError(f"conv_state: expected {ssm_state.shape[0]} slots (like ssm_state), got {conv_state.shape[0]}")
    if slot_idx is None:
        if ssm_state.shape[0] < batch:
            raise ValueError(f"ssm_state: expected at least batch = {batch} slots when slot_idx is None, got {ssm_state.shape[0]}")
        return
    V.check_tensor("slot_idx", slot_idx, ("batch",), V.INDEX_DTYPES, device=ssm_state.device, sizes=sizes)
    # Reading the indices is a host sync, which CUDA-graph capture forbids; the kernel treats an
    # out-of-range slot as padding, so skipping the check cannot write out of bounds.
    if torch.compiler.is_compiling() or (slot_idx.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    V.check_index_range("slot_idx", slot_idx, ssm_state.shape[0])


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
    out: Tensor | None = None,
) -> Tensor:
    """One (or q) decode token(s) per sequence through the mixer core; caches updated in place.

    See the module docstring for the shape contract. Returns y (or `out`, filled, when given).
    """
    check_dims(d_inner, d_xb, d_state)
    V.check_tensor("zxbc", zxbc)
    single = zxbc.dim() == 2
    zxbc3 = zxbc.unsqueeze(1) if single else zxbc
    dt3 = dt_low.unsqueeze(1) if single and isinstance(dt_low, Tensor) else dt_low
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
    V.check_tensor("ssm_state", ssm_state, ("slots", d_inner // d_state, d_state, d_state), _STATE_DTYPES, device=dev,
                   sizes=sizes)
    _check_slots(slot_idx, ssm_state, conv_state, zxbc3.shape[0], sizes)
    if zxbc.is_cuda and zxbc.dtype != torch.float64:
        check_kernel_support(d_inner, d_xb, d_state)
    args = (zxbc3, dt3, conv_state, ssm_state, slot_idx, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D,
            d_inner, d_xb, d_state, repeat_kv_before_conv)
    if out is None:
        y = mixer_step_op(*args)
        return y.squeeze(1) if single else y
    want = (zxbc3.shape[0], d_inner) if single else (zxbc3.shape[0], zxbc3.shape[1], d_inner)
    V.check_tensor("out", out, want, (zxbc.dtype,), device=dev, last_dim_contiguous=True)
    mixer_step_out_op(*args, out.unsqueeze(1) if single else out)
    return out
