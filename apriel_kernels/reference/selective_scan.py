"""Pure-PyTorch selective scan (Mamba-1 recurrence with the Apriel-H1 grouping), token-major.

Recurrence for channel c, state n, token t (mixer.md section 3, step 5):
    h[c,n] <- exp(delta[t,c] * A[c,n]) * h[c,n] + delta[t,c] * B[t,gB(c),n] * u[t,src(c)]
    y[t,c]  = sum_n C[t,gC(c),n] * h[c,n] + D[c] * u[t,src(c)]
    y[t,c] *= silu(z[t,c])                                   (when z is given)
with delta = softplus(delta_raw + delta_bias) when delta_softplus, else delta_raw + delta_bias.

Grouping (never materialised by the kernels; the reference materialises it):
- u may have D channels or Du = D / r channels; channel c reads u channel (c // (N*r)) * N + c % N,
  i.e. the 16-wide group repeat of mixer.md section 2 (r = 1 is the identity).
- B has GB groups of N states, channel c reads group c // (D / GB); C has GC groups, c // (D / GC).

Packed sequences: seq_idx (batch, seqlen) int, non-decreasing; the state resets to zero at the first
token of every document after token 0. The initial state belongs to the document of token 0; the final
state is the state after the last token.

Implementation: tokens are processed in chunks; per chunk the decays exp(delta A) and inputs delta B u
are computed for all (token, channel, state) at once, then a Python loop over the chunk's tokens runs the
recurrence vectorised over (batch, channel, state), and the readout is one reduction per chunk. (A
(T x T) decay-matrix form was measured 200x slower on CPU: it degenerates into tiny batched matmuls.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def softplus_ref(v: torch.Tensor) -> torch.Tensor:
    """softplus(v) = v for v > 20 else log1p(exp(v)) (the threshold every peer uses)."""
    return torch.where(v > 20.0, v, torch.log1p(torch.exp(torch.clamp(v, max=20.0))))


def expand_grouped_channels(u: torch.Tensor, d_inner: int, d_state: int) -> torch.Tensor:
    """(..., Du) -> (..., D) by the mixer's 16-wide group repeat (identity when Du == D)."""
    du = u.shape[-1]
    if du == d_inner:
        return u
    r = d_inner // du
    c = torch.arange(d_inner, device=u.device)
    src = (c // (d_state * r)) * d_state + c % d_state
    return u.index_select(-1, src)


def expand_groups(bc: torch.Tensor, d_inner: int) -> torch.Tensor:
    """(b, L, G, N) -> (b, L, D, N): channel c reads group c // (D / G)."""
    groups = bc.shape[2]
    return bc.repeat_interleave(d_inner // groups, dim=2)


def _chunk_size(batch: int, d_inner: int, d_state: int, budget_elems: int = 1 << 24) -> int:
    """Tokens per chunk so that the (b, T, D, N) precomputed decays stay under ~budget elements."""
    return max(1, min(256, budget_elems // max(1, batch * d_inner * d_state)))


def _recurrence_chunked(dt, A, u_full, B_full, C_full, h, keep):
    """No-grad path: chunks of T tokens bound the (b, T, D, N) temporaries. Returns (sum_n C h, h_last)."""
    batch, seqlen, d_inner = dt.shape
    T = _chunk_size(batch, d_inner, A.shape[1])
    ys = []
    for start in range(0, seqlen, T):
        stop = min(start + T, seqlen)
        # Everything that does not depend on the state is computed for the whole chunk at once.
        dA = torch.exp(dt[:, start:stop, :, None] * A)  # (b, n, D, N)
        dBu = (dt[:, start:stop] * u_full[:, start:stop])[..., None] * B_full[:, start:stop]
        hs = []
        for t in range(stop - start):
            if keep is not None:
                h = h * keep[:, start + t].view(batch, 1, 1)
            h = dA[:, t] * h + dBu[:, t]
            hs.append(h)
        ys.append((torch.stack(hs, dim=1) * C_full[:, start:stop]).sum(-1))
    y = torch.cat(ys, dim=1) if ys else dt.new_zeros(batch, 0, d_inner)
    return y, h


class _Recurrence(torch.autograd.Function):
    """h_t = keep_t * dA_t * h_{t-1} + dBu_t;  y_t = sum_n C_t h_t.  All (b, L, D, N) except h0 (b, D, N).

    Backward is the adjoint recurrence g_t = C_t gy_t + keep_{t+1} dA_{t+1} g_{t+1} (g_{L-1} also gets the
    final-state gradient), after which every input gradient is one vectorised expression.
    """

    @staticmethod
    def forward(dA, dBu, C_full, h0, keep):
        batch, seqlen = dA.shape[:2]
        hs = []
        h = h0
        for t in range(seqlen):
            if keep is not None:
                h = h * keep[:, t].view(batch, 1, 1)
            h = dA[:, t] * h + dBu[:, t]
            hs.append(h)
        hs = torch.stack(hs, dim=1) if hs else dA.new_zeros(dA.shape)
        y = (hs * C_full).sum(-1)
        return y, (hs[:, -1] if seqlen else h0.clone()), hs

    @staticmethod
    def setup_context(ctx, inputs, output):
        dA, dBu, C_full, h0, keep = inputs
        _, _, hs = output
        ctx.save_for_backward(dA, C_full, h0, keep, hs)
        ctx.mark_non_differentiable(hs)

    @staticmethod
    def backward(ctx, gy, g_final, _g_hs):
        dA, C_full, h0, keep, hs = ctx.saved_tensors
        batch, seqlen = dA.shape[:2]
        decay = dA if keep is None else dA * keep[..., None, None]  # effective multiplier of h_{t-1}
        g_h = torch.empty_like(dA)
        carry = g_final if g_final is not None else torch.zeros_like(h0)
        for t in range(seqlen - 1, -1, -1):
            carry = gy[:, t, :, None] * C_full[:, t] + carry
            g_h[:, t] = carry
            carry = decay[:, t] * carry
        h_prev = torch.cat([h0[:, None], hs[:, :-1]], dim=1)
        if keep is not None:
            h_prev = h_prev * keep[..., None, None]
        g_dA = g_h * h_prev
        g_C = gy[..., None] * hs
        return g_dA, g_h, g_C, carry, None


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_state: bool = False,
    compute_dtype: torch.dtype | None = None,
):
    """Token-major selective scan.

    u: (b, L, Du) with Du dividing D (grouped read, see module doc); delta: (b, L, D);
    A: (D, N); B: (b, L, GB, N); C: (b, L, GC, N); D: (D,) or None; z: (b, L, D) or None;
    delta_bias: (D,) or None; initial_state: (b, D, N) or None; seq_idx: (b, L) or None.
    Math runs in compute_dtype (default: float64 if any input is float64, else float32).
    Returns y (b, L, D) in u's dtype [, final_state (b, D, N) in compute_dtype].
    """
    batch, seqlen, d_inner = delta.shape
    d_state = A.shape[1]
    if compute_dtype is None:
        compute_dtype = torch.float64 if torch.float64 in (u.dtype, delta.dtype, A.dtype) else torch.float32
    f = compute_dtype
    u_full = expand_grouped_channels(u.to(f), d_inner, d_state)
    dt = delta.to(f)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)
    if delta_softplus:
        dt = softplus_ref(dt)
    A = A.to(f)
    B_full = expand_groups(B.to(f), d_inner)
    C_full = expand_groups(C.to(f), d_inner)
    h = u.new_zeros(batch, d_inner, d_state, dtype=f) if initial_state is None else initial_state.to(f)
    keep = None
    if seq_idx is not None:
        # keep[b, t] = 0 where token t starts a new document (t > 0): the state resets before it.
        keep = torch.ones(batch, seqlen, dtype=f, device=u.device)
        keep[:, 1:] = (seq_idx[:, 1:] == seq_idx[:, :-1]).to(f)
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias, initial_state)
    )
    if differentiable:
        # Whole-sequence decays and inputs, then the recurrence with a hand-written reverse scan: the
        # autograd tape of a per-token loop costs ~10x more on CPU (this is the model's CPU training path).
        dA = torch.exp(dt[..., None] * A)  # (b, L, D, N)
        dBu = (dt * u_full)[..., None] * B_full
        y, h, _ = _Recurrence.apply(dA, dBu, C_full, h, keep)
    else:
        y, h = _recurrence_chunked(dt, A, u_full, B_full, C_full, h, keep)
    if D is not None:
        y = y + D.to(f) * u_full
    if z is not None:
        y = y * F.silu(z.to(f))
    y = y.to(u.dtype)
    if return_final_state:
        return y, h
    return y


def selective_scan_sequential_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None, seq_idx=None
):
    """The naive token-by-token float64 loop the chunked reference is tested against. Same contract."""
    batch, seqlen, d_inner = delta.shape
    d_state = A.shape[1]
    f = torch.float64
    u_full = expand_grouped_channels(u.to(f), d_inner, d_state)
    dt = delta.to(f) + (delta_bias.to(f) if delta_bias is not None else 0.0)
    if delta_softplus:
        dt = softplus_ref(dt)
    B_full, C_full = expand_groups(B.to(f), d_inner), expand_groups(C.to(f), d_inner)
    h = torch.zeros(batch, d_inner, d_state, dtype=f) if initial_state is None else initial_state.to(f).clone()
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            reset = (seq_idx[:, t] != seq_idx[:, t - 1]).to(f).view(batch, 1, 1)
            h = h * (1 - reset)
        h = torch.exp(dt[:, t, :, None] * A.to(f)) * h + (dt[:, t] * u_full[:, t])[..., None] * B_full[:, t]
        y = (h * C_full[:, t]).sum(-1)
        if D is not None:
            y = y + D.to(f) * u_full[:, t]
        if z is not None:
            y = y * F.silu(z[:, t].to(f))
        ys.append(y)
    return torch.stack(ys, dim=1), h
