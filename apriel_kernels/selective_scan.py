"""Selective scan ops: the generic token-major scan and the mamba-ssm compatible `selective_scan_fn`.

    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, seq_idx=None, return_final_state=False)
        u: (b, L, Du) with Du = D or D/r (grouped read, mixer.md section 2); delta, z: (b, L, D);
        A: (D, N) fp32; B: (b, L, GB, N); C: (b, L, GC, N); D, delta_bias: (D,) fp32;
        initial_state: (b, D, N) fp32; seq_idx: (b, L) int32 (packed documents).
        Activations bf16|fp16|fp32|fp64 (one dtype); any strides. Returns y (b, L, D) [, final (b, D, N) fp32].
    selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False)
        mamba-ssm's argument order and layouts: u, delta, z: (b, D, L); B, C: (b, N, L) or (b, G, N, L).

Both are differentiable w.r.t. every floating input (A, B, C, D, delta_bias, initial_state included).

Devices: CPU runs the float64-capable reference. CUDA runs the kernels of csrc/sscan/ for bf16 / fp16 / fp32
activations (float64 runs the reference on any device) when d_state <= 64 and each B / C group spans a
multiple or a divisor of 16 channels; other CUDA shapes raise a ValueError naming the argument (the
reference stands in only with APRIEL_KERNELS_ALLOW_REFERENCE=1). Everything the kernel needs is checked
here, before it is called: a C++ exception from an extension op crashes the GPU machine's process
(docs/notes/STATUS.md item 4).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _validate as V
from ._autograd_ref import reference_vjp
from ._ext import allow_reference_on_gpu, cuda_kernel
from .reference.selective_scan import selective_scan_ref

__all__ = ["selective_scan", "selective_scan_fn", "selective_scan_ref"]


KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_KERNEL_D_STATE = 64
_CHANNELS_PER_BLOCK, _TILE, _ROW = 16, 32, 17  # csrc/sscan/sscan_params.h


def _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx) -> None:
    """Every argument's shape, dtype and device (ValueError / TypeError naming the argument)."""
    sizes = V.Sizes()
    V.check_tensor("delta", delta, ("batch", "seqlen", "d_inner"), V.FLOAT_DTYPES, sizes=sizes)
    dev = delta.device
    V.check_tensor("u", u, ("batch", "seqlen", None), (delta.dtype,), device=dev, sizes=sizes)
    V.check_tensor("A", A, ("d_inner", "d_state"), (torch.float32, torch.float64), device=dev, sizes=sizes)
    d_inner, d_state = sizes["d_inner"], sizes["d_state"]
    if u.shape[2] == 0 or d_inner % u.shape[2] or (u.shape[2] != d_inner and u.shape[2] % d_state):
        raise ValueError(f"u: expected channels (dim 2) = d_inner ({d_inner}) or a multiple of d_state dividing it, got {u.shape[2]}")
    V.check_tensor("B", B, ("batch", "seqlen", None, "d_state"), (delta.dtype,), device=dev, sizes=sizes)
    V.check_tensor("C", C, ("batch", "seqlen", None, "d_state"), (delta.dtype,), device=dev, sizes=sizes)
    for name, t in (("B", B), ("C", C)):
        if t.shape[2] == 0 or d_inner % t.shape[2]:
            raise ValueError(f"{name}: expected a group count (dim 2) dividing d_inner = {d_inner}, got {t.shape[2]}")
    param_dtypes = (torch.float32, torch.float64)
    V.check_tensor("D", D, ("d_inner",), param_dtypes, device=dev, sizes=sizes, optional=True)
    V.check_tensor("z", z, ("batch", "seqlen", "d_inner"), (delta.dtype,), device=dev, sizes=sizes, optional=True)
    V.check_tensor("delta_bias", delta_bias, ("d_inner",), param_dtypes, device=dev, sizes=sizes, optional=True)
    V.check_tensor("initial_state", initial_state, ("batch", "d_inner", "d_state"), param_dtypes, device=dev, sizes=sizes, optional=True)
    V.check_tensor("seq_idx", seq_idx, ("batch", "seqlen"), V.INDEX_DTYPES, device=dev, sizes=sizes, optional=True)


def kernel_smem_bytes(d_inner: int, d_state: int, groups_b: int, groups_c: int) -> tuple[int, int]:
    """Dynamic shared memory (forward, backward) of the CUDA kernels; mirrors csrc/sscan/sscan_params.h."""
    n_pass = -(-d_state // 16)

    def row(groups):
        cpg = d_inner // groups
        ngl = 1 if cpg >= _CHANNELS_PER_BLOCK else _CHANNELS_PER_BLOCK // cpg
        return ngl * 16 * n_pass + 1

    bc = _TILE * (row(groups_b) + row(groups_c))
    fwd = 7 * _TILE * _ROW + bc + _TILE + n_pass * 256
    bwd = 14 * _TILE * _ROW + bc + _TILE + 2 * n_pass * 256 + 2 * _TILE * 256
    return 4 * fwd, 4 * bwd


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin


def kernel_unsupported_reason(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Optional[str]:
    """None when the CUDA kernels cover these (already validated) arguments, else why not (naming the argument)."""
    d_inner, d_state = A.shape
    if delta.shape[0] > 65535:
        return f"delta: the CUDA selective scan supports batch <= 65535 (one grid row per sequence), got {delta.shape[0]}"
    if not 1 <= d_state <= MAX_KERNEL_D_STATE:
        return f"d_state: the CUDA selective scan supports d_state 1..{MAX_KERNEL_D_STATE}, got {d_state}"
    for name, t in (("B", B), ("C", C)):
        cpg = d_inner // t.shape[2]
        if cpg % _CHANNELS_PER_BLOCK and _CHANNELS_PER_BLOCK % cpg:
            return (f"{name}: the CUDA selective scan needs d_inner / groups to be a multiple or a divisor of 16, "
                    f"got {d_inner} / {t.shape[2]} = {cpg}")
    smem = max(kernel_smem_bytes(d_inner, d_state, B.shape[2], C.shape[2]))
    limit = _smem_limit(delta.device.index if delta.device.index is not None else torch.cuda.current_device())
    if smem > limit:
        return (f"B, C: {B.shape[2]} / {C.shape[2]} groups at d_state {d_state} need {smem} bytes of shared memory "
                f"per block in the CUDA selective scan, the device has {limit}")
    return None


def _cuda_kernel(op_name: str, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor):
    """The compiled op for these CUDA arguments, or None where the reference runs (float64, or allowed)."""
    if u.dtype not in KERNEL_DTYPES:
        return None  # float64: the reference is the implementation
    # the sequence splits' knobs (the backward reads both: it may rerun the forward)
    for knob in ("APRIEL_SSCAN_FWD_SEGMENTS", "APRIEL_SSCAN_BWD_SEGMENTS"):
        V.check_env_positive_int(knob)
    reason = kernel_unsupported_reason(u, delta, A, B, C)
    if reason is not None:
        if allow_reference_on_gpu():
            return None
        raise ValueError(f"{reason} (set APRIEL_KERNELS_ALLOW_REFERENCE=1 to run the slow reference on the GPU)")
    return cuda_kernel(op_name)


def _kernel_runs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> bool:
    """Whether the CUDA kernel (not the reference) computes these (validated) arguments; fake and real agree."""
    if not u.is_cuda or u.dtype not in KERNEL_DTYPES or kernel_unsupported_reason(u, delta, A, B, C) is not None:
        return False
    try:
        return cuda_kernel("selective_scan_fwd") is not None
    except Exception:  # noqa: BLE001 - no kernel and no reference allowed: the op itself raises
        return False


def _checkpoint_shape(delta: Tensor, A: Tensor) -> tuple[int, int, int, int]:
    batch, seqlen, d_inner = delta.shape
    return batch, -(-seqlen // _TILE), d_inner, A.shape[1]


def _reference_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx):
    y, final = selective_scan_ref(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, return_final_state=True
    )
    return y, final.to(torch.float64 if u.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("apriel::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    initial_state: Optional[Tensor],
    seq_idx: Optional[Tensor],
    save_checkpoints: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y (b, L, D) contiguous in u's dtype, final_state (b, D, N) fp32 (fp64 for fp64 inputs),
    checkpoints). checkpoints: the fp32 states before every 32-token tile, (b, ceil(L/32), D, N), when
    save_checkpoints and the CUDA kernel runs (the backward then skips its forward rerun); else empty (0,)."""
    if u.is_cuda:
        _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
        kernel = _cuda_kernel("selective_scan_fwd", u, delta, A, B, C)
        if kernel is not None:
            return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, save_checkpoints)
    y, final = _reference_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx)
    return y.contiguous(), final.contiguous(), u.new_empty(0, dtype=torch.float32)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, save_checkpoints):
    batch, seqlen, d_inner = delta.shape
    state_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    saved = save_checkpoints and _kernel_runs(u, delta, A, B, C)
    ckpt = u.new_empty(_checkpoint_shape(delta, A) if saved else (0,), dtype=torch.float32)
    return u.new_empty(batch, seqlen, d_inner), u.new_empty(batch, d_inner, A.shape[1], dtype=state_dtype), ckpt


@torch.library.custom_op("apriel::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    initial_state: Optional[Tensor],
    seq_idx: Optional[Tensor],
    dy: Tensor,
    dfinal_state: Optional[Tensor],
    checkpoints: Optional[Tensor],
) -> list[Tensor]:
    """Gradients [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state], each shaped like its input
    (an empty tensor for an input that is None). checkpoints: the forward's (b, ceil(L/32), D, N) fp32 states,
    or None / empty (the CUDA kernel then reruns the forward for them; the reference ignores them)."""
    if u.is_cuda:
        _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
        V.check_tensor("dy", dy, tuple(delta.shape), device=delta.device)
        V.check_tensor("dfinal_state", dfinal_state, (delta.shape[0], delta.shape[2], A.shape[1]),
                       device=delta.device, optional=True)
        if checkpoints is not None and checkpoints.numel() > 0:
            V.check_tensor("checkpoints", checkpoints, _checkpoint_shape(delta, A), (torch.float32,), device=delta.device)
            if not checkpoints.is_contiguous():
                raise ValueError("checkpoints: expected a contiguous tensor (the forward's output)")
        kernel = _cuda_kernel("selective_scan_bwd", u, delta, A, B, C)
        if kernel is not None:
            return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, dy, dfinal_state,
                          checkpoints)

    def forward(u_, delta_, A_, B_, C_, D_, z_, db_, init_):
        return _reference_forward(u_, delta_, A_, B_, C_, D_, z_, db_, delta_softplus, init_, seq_idx)

    primals = [u, delta, A, B, C, D, z, delta_bias, initial_state]
    grads = reference_vjp(forward, primals, [dy, dfinal_state])
    return [
        (g.to(p.dtype).contiguous() if g is not None else torch.zeros_like(p)) if p is not None else u.new_empty(0)
        for g, p in zip(grads, primals)
    ]


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, dy, dfinal_state, checkpoints):
    primals = [u, delta, A, B, C, D, z, delta_bias, initial_state]
    return [torch.empty_like(p, memory_format=torch.contiguous_format) if p is not None else u.new_empty(0) for p in primals]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, _save = inputs
    ckpt = output[2]
    ctx.mark_non_differentiable(ckpt)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, ckpt)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dy, dfinal_state, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, ckpt = ctx.saved_tensors
    grads = selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state, seq_idx, dy, dfinal_state,
        ckpt if ckpt.numel() > 0 else None,
    )
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit = grads
    present = lambda g, p: g if p is not None else None  # noqa: E731
    return (
        du, ddelta, dA, dB, dC, present(dD, D), present(dz, z), present(ddelta_bias, delta_bias), None,
        present(dinit, initial_state), None, None,
    )


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_state: bool = False,
):
    """Token-major selective scan; see the module docstring for the shape contract."""
    _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    # (early, clearer error; under torch.compile the op body checks the same at run time)
    if delta.is_cuda and delta.dtype in KERNEL_DTYPES and not torch.compiler.is_compiling() and not allow_reference_on_gpu():
        reason = kernel_unsupported_reason(u, delta, A, B, C)
        if reason is not None:
            raise ValueError(f"{reason} (set APRIEL_KERNELS_ALLOW_REFERENCE=1 to run the slow reference on the GPU)")
    # Save the state checkpoints in the forward when a backward can follow: it then skips a forward rerun.
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)
    )
    y, final, _ = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, save)
    return (y, final) if return_final_state else y


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """mamba-ssm compatible entry point (channel-major): y (b, D, L) [, last_state (b, D, N)]."""
    for name, t in (("u", u), ("delta", delta)):
        V.check_tensor(name, t, (None, None, None))
    if B.dim() not in (3, 4) or C.dim() not in (3, 4):
        raise ValueError(
            f"B, C: expected input-dependent (b, N, L) or (b, G, N, L) tensors, got shapes {tuple(B.shape)}, {tuple(C.shape)}"
        )

    def token_major_groups(t: Tensor) -> Tensor:
        t = t.unsqueeze(1) if t.dim() == 3 else t  # (b, G, N, L)
        return t.permute(0, 3, 1, 2)  # (b, L, G, N), a view

    result = selective_scan(
        u.transpose(1, 2),
        delta.transpose(1, 2),
        A,
        token_major_groups(B),
        token_major_groups(C),
        D=D.float() if D is not None else None,
        z=z.transpose(1, 2) if z is not None else None,
        delta_bias=delta_bias.float() if delta_bias is not None else None,
        delta_softplus=delta_softplus,
        return_final_state=return_last_state,
    )
    if return_last_state:
        y, last = result
        return y.transpose(1, 2), last
    return result.transpose(1, 2)
