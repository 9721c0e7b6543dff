"""The fused Apriel-H1 mixer scan (prefill / training): from the in_proj output to the y of out_proj.

    mixer_scan(zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D, *,
               d_inner, d_xb, d_state, repeat_kv_before_conv=True, initial_ssm_state=None,
               initial_conv_state=None, seq_idx=None, return_final_states=False)
        zxbc: (b, L, 2D+2X) in_proj output (may be a strided view; the last dim must have unit stride);
        dt_low: (b, L, R); conv_weight: (Cc, W) or (Cc, 1, W), Cc = D if repeat_kv_before_conv else X;
        conv_bias: (Cc,) or None; dt_proj_weight: (D, R); dt_proj_bias: (D,); A_log: (D, N) fp32; D: (D,) fp32;
        initial_ssm_state: (b, D/N, N, N) fp32; initial_conv_state: (b, X or D, S >= W-1);
        seq_idx: (b, L) int32 (packed documents: states reset at document starts).
        Returns y (b, L, D) in zxbc's dtype [, final_ssm_state (b, D/N, N, N) fp32, final_conv_state (b, X, W-1)].
        Differentiable w.r.t. zxbc, dt_low, every parameter and the initial states.

Semantics: mixer.md section 3 and apriel_kernels.reference.mixer.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import _validate as V
from ._autograd_ref import reference_vjp
from ._ext import cuda_kernel, has_kernel
from ._mixer_common import check_dims, check_mixer_params, conv_weight_2d, state_dtype
from .reference.mixer import mixer_scan_ref

__all__ = ["mixer_scan", "mixer_scan_ref"]


def _scan_reference(zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D,
                    initial_ssm_state, initial_conv_state, seq_idx, d_inner, d_xb, d_state, repeat_kv_before_conv):
    y, ssm, conv = mixer_scan_ref(
        zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D,
        d_inner=d_inner, d_xb=d_xb, d_state=d_state, repeat_kv_before_conv=repeat_kv_before_conv,
        initial_ssm_state=initial_ssm_state, initial_conv_state=initial_conv_state, seq_idx=seq_idx,
        return_final_states=True,
    )
    return y, ssm.to(state_dtype(zxbc.dtype)), conv


KERNEL_D_STATE = 16  # the CUDA kernels keep 16 states per channel in registers
CHUNK = 32  # tokens between the CUDA forward's state checkpoints (csrc/scan/scan_common.cuh kChunk)
SUB_CKPT_ROWS = 3  # sub-chunk checkpoint rows per chunk: the states after tokens 7, 15, 23 (scan_params.h kSubCkptRows)


def _use_kernel(zxbc: Tensor) -> bool:
    """The CUDA kernels cover bf16/fp16/fp32 activations; float64 (ground-truth runs) stays on the reference."""
    return zxbc.is_cuda and zxbc.dtype != torch.float64


CHECKPOINT_MODES = ("tile", "sub", "sub-always")  # APRIEL_SCAN_CKPT (unset: tile)


def _checkpoint_mode(zxbc: Tensor, dt_low: Tensor, seq_idx: Optional[Tensor], d_inner: int, d_xb: int,
                     save_checkpoints: bool) -> int:
    """What the CUDA forward saves for the backward: 0 nothing, 1 the state before every CHUNK tokens, 2 also the
    states after tokens 7, 15, 23 of every chunk (one flat buffer: 4x the memory of 1, plus a flag).

    With 2 the v7 backward loads the states it needs at its 8-token sub-chunk starts instead of recomputing them from
    the chunk's checkpoint (its "pass A"; session 30, docs/notes/scan.md: backward -6 to -11 %, fwd+bwd -6 % at b4 / b8
    L4096 d_inner 4096). The v7 forward and, since session 31, the v5 forward and the varlen v7 (packed documents at
    small grids) for whole groups of 4 heads write them and set the flag; with any other kernel the flag stays 0 and
    the backward recomputes. APRIEL_SCAN_CKPT picks:
      tile (the default): 1 - 8 KB per token at d_inner 4096 (b8 L4096: 268 MB per call), far below what mamba-ssm
        saves per token (issue 3);
      sub: 2 where the forward's dispatcher runs such a kernel and the backward a v7 kernel that reads them (asked of
        the extension: 16-bit activations, dt_rank <= 16, 16-byte aligned rows, not one head per group; under the
        varlen plan whole groups of 4 heads), else 1; 32 KB per token (b8 L4096: 1,074 MB), for training with memory
        to spare (or activation checkpointing, which keeps one layer's at a time);
      sub-always: 2 wherever checkpoints are saved (tests).
    """
    if not save_checkpoints:
        return 0
    knob = os.environ.get("APRIEL_SCAN_CKPT", "") or "tile"
    if knob not in CHECKPOINT_MODES:
        raise ValueError(f"APRIEL_SCAN_CKPT: expected one of {CHECKPOINT_MODES} (or unset), got {knob!r}")
    if knob != "sub":
        return 2 if knob == "sub-always" else 1
    if zxbc.dtype not in (torch.bfloat16, torch.float16) or not has_kernel("mixer_scan_fwd_writes_sub_checkpoints"):
        return 1
    with torch.cuda.device(zxbc.device):  # (the dispatcher's SM count is the current device's)
        writes = torch.ops.apriel_C.mixer_scan_fwd_writes_sub_checkpoints(
            int(zxbc.shape[0]), d_inner, d_xb, int(dt_low.shape[-1]), seq_idx is not None)
    return 2 if writes else 1


def _checkpoint_buffer(zxbc: Tensor, d_inner: int, mode: int) -> Tensor:
    """The checkpoint output's shape for a mode of _checkpoint_mode (the fake of the kernel's)."""
    batch, seqlen, _ = zxbc.shape
    tiles = (seqlen + CHUNK - 1) // CHUNK
    if mode == 2:  # the tile checkpoints, the sub-chunk ones and the flag (scan_api.cpp ckpt_layout)
        return zxbc.new_empty((1 + SUB_CKPT_ROWS) * batch * tiles * d_inner * KERNEL_D_STATE + 1, dtype=torch.float32)
    if mode == 1:
        return zxbc.new_empty(batch, tiles, d_inner, KERNEL_D_STATE, dtype=torch.float32)
    return zxbc.new_empty(0, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- scan
@torch.library.custom_op("apriel::mixer_scan_fwd", mutates_args=())
def mixer_scan_fwd(
    zxbc: Tensor,
    dt_low: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    dt_proj_weight: Tensor,
    dt_proj_bias: Tensor,
    A_log: Tensor,
    D: Tensor,
    initial_ssm_state: Optional[Tensor],
    initial_conv_state: Optional[Tensor],
    seq_idx: Optional[Tensor],
    d_inner: int,
    d_xb: int,
    d_state: int,
    repeat_kv_before_conv: bool,
    save_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y (b, L, D), final_ssm_state (b, D/N, N, N) fp32, final_conv_state (b, X, W-1), checkpoints).

    checkpoints: the CUDA kernel's fp32 states for the backward when save_checkpoints - before every CHUNK tokens,
    (b, ceil(L/CHUNK), D, N), or flat with the sub-chunk states too (_checkpoint_mode); an empty tensor otherwise and
    on the reference.
    """
    if _use_kernel(zxbc):
        kernel = cuda_kernel("mixer_scan_fwd")
        if kernel is not None:
            mode = _checkpoint_mode(zxbc, dt_low, seq_idx, d_inner, d_xb, save_checkpoints)
            return kernel(zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D,
                          initial_ssm_state, initial_conv_state, seq_idx, d_inner, d_xb, d_state,
                          repeat_kv_before_conv, mode)
    y, ssm, conv = _scan_reference(zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D,
                                   initial_ssm_state, initial_conv_state, seq_idx, d_inner, d_xb, d_state,
                                   repeat_kv_before_conv)
    return y.contiguous(), ssm.contiguous(), conv.contiguous(), zxbc.new_empty(0, dtype=torch.float32)


@mixer_scan_fwd.register_fake
def _(zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D, initial_ssm_state,
      initial_conv_state, seq_idx, d_inner, d_xb, d_state, repeat_kv_before_conv, save_checkpoints):
    batch, seqlen, _ = zxbc.shape
    width = conv_weight.shape[-1]
    kernel = _use_kernel(zxbc) and has_kernel("mixer_scan_fwd")
    ckpt = _checkpoint_buffer(zxbc, d_inner,
                              _checkpoint_mode(zxbc, dt_low, seq_idx, d_inner, d_xb, save_checkpoints and kernel))
    return (
        zxbc.new_empty(batch, seqlen, d_inner),
        zxbc.new_empty(batch, d_inner // d_state, d_state, d_state, dtype=state_dtype(zxbc.dtype)),
        zxbc.new_empty(batch, d_xb, width - 1),
        ckpt,
    )


@torch.library.custom_op("apriel::mixer_scan_bwd", mutates_args=())
def mixer_scan_bwd(
    zxbc: Tensor,
    dt_low: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    dt_proj_weight: Tensor,
    dt_proj_bias: Tensor,
    A_log: Tensor,
    D: Tensor,
    initial_ssm_state: Optional[Tensor],
    initial_conv_state: Optional[Tensor],
    seq_idx: Optional[Tensor],
    d_inner: int,
    d_xb: int,
    d_state: int,
    repeat_kv_before_conv: bool,
    dy: Tensor,
    dfinal_ssm_state: Optional[Tensor],
    dfinal_conv_state: Optional[Tensor],
    checkpoints: Optional[Tensor],
) -> list[Tensor]:
    """Gradients [dzxbc, ddt_low, dconv_weight, dconv_bias, ddt_proj_weight, ddt_proj_bias, dA_log, dD,
    dinitial_ssm_state, dinitial_conv_state], each shaped and typed like its input (empty when None)."""
    if _use_kernel(zxbc):
        V.check_env_positive_int("APRIEL_SCAN_BWD_SEGMENTS")
        kernel = cuda_kernel("mixer_scan_bwd")
        if kernel is not None:
            return kernel(zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D,
                          initial_ssm_state, initial_conv_state, seq_idx, d_inner, d_xb, d_state,
                          repeat_kv_before_conv, dy, dfinal_ssm_state, dfinal_conv_state, checkpoints)

    def forward(zxbc_, dt_low_, cw_, cb_, dtw_, dtb_, alog_, d_, init_ssm_, init_conv_):
        return _scan_reference(zxbc_, dt_low_, cw_, cb_, dtw_, dtb_, alog_, d_, init_ssm_, init_conv_, seq_idx,
                               d_inner, d_xb, d_state, repeat_kv_before_conv)

    primals = [zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D, initial_ssm_state,
               initial_conv_state]
    grads = reference_vjp(forward, primals, [dy, dfinal_ssm_state, dfinal_conv_state])
    return [
        (g.to(p.dtype).contiguous() if g is not None else torch.zeros_like(p)) if p is not None else zxbc.new_empty(0)
        for g, p in zip(grads, primals)
    ]


@mixer_scan_bwd.register_fake
def _(zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D, initial_ssm_state,
      initial_conv_state, seq_idx, d_inner, d_xb, d_state, repeat_kv_before_conv, dy, dfinal_ssm_state,
      dfinal_conv_state, checkpoints):
    primals = [zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D, initial_ssm_state,
               initial_conv_state]
    return [torch.empty_like(p, memory_format=torch.contiguous_format) if p is not None else zxbc.new_empty(0)
            for p in primals]


def _scan_setup_context(ctx, inputs, output):
    (zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D, initial_ssm_state,
     initial_conv_state, seq_idx, d_inner, d_xb, d_state, repeat_kv_before_conv, save_checkpoints) = inputs
    ctx.save_for_backward(zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D,
                          initial_ssm_state, initial_conv_state, seq_idx, output[3])
    ctx.dims = (d_inner, d_xb, d_state, repeat_kv_before_conv)
    # Unused outputs get None, not materialised zeros: the checkpoints' zero gradient alone was a fill of the
    # checkpoint size (268 MB at b8 L4096: ~0.09 ms and that much peak memory per backward).
    ctx.set_materialize_grads(False)


def _scan_backward(ctx, dy, dfinal_ssm_state, dfinal_conv_state, _dcheckpoints):
    (zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D, initial_ssm_state,
     initial_conv_state, seq_idx, checkpoints) = ctx.saved_tensors
    if dy is None:  # only the final states carry gradient
        dy = zxbc.new_zeros(zxbc.shape[0], zxbc.shape[1], ctx.dims[0])
    primals = [zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D, initial_ssm_state,
               initial_conv_state]
    grads = mixer_scan_bwd(*primals, seq_idx, *ctx.dims, dy, dfinal_ssm_state, dfinal_conv_state, checkpoints)
    out = [g if p is not None else None for g, p in zip(grads, primals)]
    return (*out[:10], None, None, None, None, None, None)


mixer_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def mixer_scan(
    zxbc: Tensor,
    dt_low: Tensor,
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
    initial_ssm_state: Tensor | None = None,
    initial_conv_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_states: bool = False,
):
    """Fused mixer forward from the in_proj output to y; see the module docstring."""
    check_dims(d_inner, d_xb, d_state)
    sizes = V.Sizes(d_inner=d_inner, d_xb=d_xb, d_state=d_state, zxbc_width=2 * d_inner + 2 * d_xb)
    V.check_tensor("zxbc", zxbc, ("batch", "seqlen", "zxbc_width"), V.FLOAT_DTYPES, sizes=sizes, last_dim_contiguous=True)
    dev = zxbc.device
    V.check_tensor("dt_low", dt_low, ("batch", "seqlen", "dt_rank"), (zxbc.dtype,), device=dev, sizes=sizes, last_dim_contiguous=True)
    conv_weight = conv_weight_2d(conv_weight)
    check_mixer_params(conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D, dev, sizes, repeat_kv_before_conv)
    state_dtypes = (torch.float32, torch.float64)
    V.check_tensor("initial_ssm_state", initial_ssm_state, ("batch", d_inner // d_state, d_state, d_state), state_dtypes,
                   device=dev, sizes=sizes, optional=True)
    if initial_conv_state is not None:
        V.check_tensor("initial_conv_state", initial_conv_state, ("batch", None, None), V.FLOAT_DTYPES, device=dev, sizes=sizes)
        allowed = (d_xb, d_inner) if repeat_kv_before_conv else (d_xb,)
        if initial_conv_state.shape[1] not in allowed or initial_conv_state.shape[2] < conv_weight.shape[1] - 1:
            raise ValueError(f"initial_conv_state: expected (batch, one of {allowed}, >= {conv_weight.shape[1] - 1}), got {tuple(initial_conv_state.shape)}")
    V.check_tensor("seq_idx", seq_idx, ("batch", "seqlen"), V.INDEX_DTYPES, device=dev, sizes=sizes, optional=True)
    if _use_kernel(zxbc) and d_state != KERNEL_D_STATE:
        raise ValueError(f"d_state: the CUDA mixer scan is written for d_state = 16, got {d_state} "
                         "(float64 inputs run the reference)")
    if _use_kernel(zxbc) and dt_low.shape[-1] > 32:
        raise ValueError(f"dt_low: the CUDA mixer scan supports dt_rank <= 32, got {dt_low.shape[-1]}")
    # Checkpoints only when a backward can follow (they cost 8 KB per token of memory traffic).
    tensors = (zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D, initial_ssm_state,
               initial_conv_state)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, ssm, conv, _ = mixer_scan_fwd(zxbc, dt_low, conv_weight, conv_bias, dt_proj_weight, dt_proj_bias, A_log, D,
                                     initial_ssm_state, initial_conv_state, seq_idx, d_inner, d_xb, d_state,
                                     repeat_kv_before_conv, save)
    return (y, ssm, conv) if return_final_states else y


# ------------------------------------------------------------------------------------------------- varlen plan
VARLEN_MAX_DOCUMENTS = 2048  # csrc/scan/scan_params.h kVarlenMaxDocs: more documents per call never run varlen


def varlen_plan(seq_idx: Tensor, d_inner: int, force: bool = False, d_xb: int | None = None) -> dict:
    """How a CUDA forward with these packed documents is scheduled (session 17, csrc/scan/mixer_scan_plan.cu).

    Where the dispatcher would run the batch-1-3 kernel with documents (16-bit activations, the v7 layout
    applicable), a plan on the device lists the documents and picks the varlen v7 kernel - one block per (block
    column, document), a column being 4 heads of one x / B group or, where 4 does not divide the heads per group, a
    group's share of them (session 23) - when its estimate beats the other kernel's; ``force`` picks it whenever the
    documents fit (as APRIEL_SCAN_FWD=v7var does). seq_idx: (batch, seqlen) int32 on a CUDA device; a document starts
    at the first token and wherever the id changes. d_xb: the x / B width (default d_inner / 4). Returns {"varlen":
    bool, "documents": (n, 3) int32 (sequence, first token, end token) longest first - empty when varlen was not
    picked}.
    """
    V.check_tensor("seq_idx", seq_idx, (None, None), (torch.int32,))
    if seq_idx.shape[0] < 1 or seq_idx.shape[1] < 1:
        raise ValueError(f"seq_idx: expected (batch >= 1, seqlen >= 1), got shape {tuple(seq_idx.shape)}")
    if d_xb is None:
        d_xb = d_inner // 4
    if d_xb < 16 or d_xb % 16:
        raise ValueError(f"d_xb: expected a positive multiple of 16 (heads of 16 channels), got {d_xb}")
    if d_inner < d_xb or d_inner % d_xb:
        raise ValueError(f"d_inner: expected a positive multiple of d_xb ({d_xb}), got {d_inner}")
    if not seq_idx.is_cuda:
        raise ValueError(f"seq_idx: expected a CUDA tensor (the plan runs on the device), got {seq_idx.device}")
    ws = cuda_kernel("mixer_scan_varlen_plan")(seq_idx, d_inner, d_xb, force).cpu()
    # the workspace: cap x (sequence, first, end, 0), count, skip, then one counter per block column (unread here)
    cap = VARLEN_MAX_DOCUMENTS
    count, skip = ws[4 * cap].item(), ws[4 * cap + 1].item()
    return {"varlen": bool(skip), "documents": ws[: 4 * cap].view(cap, 4)[:count, :3].clone()}
