"""Backward passes of the reference implementations: the VJP of the pure-PyTorch forward.

The custom ops' CPU backward (and the GPU fallback) is the vector-Jacobian product of the reference
forward, recomputed in the inputs' precision: exact for float64, the definition for everything else.

A custom op's implementation runs below the Autograd dispatch key (the autograd keys are in the
thread-local exclude set), where tape-based autograd records nothing. `_autograd_inside_op` lifts that
exclusion for the duration of the recomputation and restores it after; plain tensors stay plain, so the
op also passes torch.library.opcheck (functorch's vjp, the earlier approach, wrapped tensors that
opcheck's dispatch modes reject).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView)


@contextlib.contextmanager
def _autograd_inside_op():
    saved = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in _AUTOGRAD_KEYS]
    try:
        for key in _AUTOGRAD_KEYS:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        with torch.enable_grad():
            yield
    finally:
        for key, was_excluded in zip(_AUTOGRAD_KEYS, saved):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was_excluded)


def reference_vjp(
    forward: Callable[..., Sequence[torch.Tensor]],
    primals: Sequence[torch.Tensor | None],
    cotangents: Sequence[torch.Tensor | None],
) -> list[torch.Tensor | None]:
    """Gradients of sum_i <forward(*primals)[i], cotangents[i]> w.r.t. every floating primal.

    None primals (and non-floating ones) get None; None or empty cotangents count as zero; a primal the
    outputs do not depend on gets zeros.
    """
    with _autograd_inside_op():
        leaves = [
            p.detach().requires_grad_(True) if isinstance(p, torch.Tensor) and p.is_floating_point() else p
            for p in primals
        ]
        outputs = tuple(forward(*leaves))
        pairs = [
            (o, g.to(o.dtype))
            for o, g in zip(outputs, cotangents)
            if g is not None and g.numel() > 0 and o.requires_grad
        ]
        wrt = [p for p in leaves if isinstance(p, torch.Tensor) and p.requires_grad]
        if pairs and wrt:
            grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        else:
            grads = [None] * len(wrt)
    result: list[torch.Tensor | None] = []
    it = iter(grads)
    for p in leaves:
        if isinstance(p, torch.Tensor) and p.requires_grad:
            g = next(it)
            result.append(torch.zeros_like(p) if g is None else g.detach())
        else:
            result.append(None)
    return result
