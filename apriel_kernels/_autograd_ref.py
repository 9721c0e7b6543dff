"""Backward passes of the reference implementations: the VJP of the pure-PyTorch forward.

The custom ops' CPU backward (and the GPU fallback) is the vector-Jacobian product of the reference
forward, recomputed in the inputs' precision: exact for float64, the definition for everything else.
torch.func.vjp is used rather than torch.autograd.grad because a custom op's implementation runs below
the Autograd dispatch key, where tape-based autograd records nothing; functorch's transform does.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def reference_vjp(
    forward: Callable[..., Sequence[torch.Tensor]],
    primals: Sequence[torch.Tensor | None],
    cotangents: Sequence[torch.Tensor | None],
) -> list[torch.Tensor | None]:
    """Gradients of sum_i <forward(*primals)[i], cotangents[i]> w.r.t. every floating primal.

    None primals (and non-floating ones) get None; None or empty cotangents count as zero.
    """
    diff_pos = [i for i, p in enumerate(primals) if isinstance(p, torch.Tensor) and p.is_floating_point()]

    def partial(*diff_args):
        args = list(primals)
        for i, a in zip(diff_pos, diff_args):
            args[i] = a
        return tuple(forward(*args))

    outputs, vjp_fn = torch.func.vjp(partial, *[primals[i] for i in diff_pos])
    cots = []
    for o, g in zip(outputs, list(cotangents) + [None] * (len(outputs) - len(cotangents))):
        cots.append(torch.zeros_like(o) if g is None or g.numel() == 0 else g.to(o.dtype))
    grads = vjp_fn(tuple(cots))
    result: list[torch.Tensor | None] = [None] * len(primals)
    for i, g in zip(diff_pos, grads):
        result[i] = g
    return result
