"""Fused per-row distillation loss over the vocabulary, in Triton (GPU; also runs under TRITON_INTERPRET=1).

    loss, grad = fused_kl_rows(s_logits, t_logits, labels, kind, temperature, ce_weight, grad_scale)
        s_logits, t_logits: (n, V) fp32 | bf16 | fp16, unit stride in V (row stride free);
        labels: (n,) int64 next-token ids (used only when ce_weight > 0);
        returns loss (n,) fp32 and grad (n, V) fp32 = grad_scale * d loss_row / d s_logits.

One program per token row. Pass 1 streams vocab tiles once and keeps, for both models, an online
log-sum-exp (running max m, running sum z) plus the running expectation E_q[s - t] (reverse) or
E_p[t - s] (forward), rescaled like z when the max moves; then KL = E - lse_s + lse_t (reverse) or
E - lse_t + lse_s (forward) without a second normalisation pass. Pass 2 re-reads the tile and writes
the gradient: reverse  q (log q - log p - KL);  forward  q - p;  CE  q - onehot(label)  (all / T).
Why two passes and not one: the reverse-KL gradient needs the row's KL, known only after the last tile.
Memory traffic: 3 reads of V logits + 1 write per row; nothing (n, V) is allocated besides the gradient.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch path covers machines without Triton
    triton = None


if triton is not None:

    @triton.jit
    def _kl_rows_kernel(S, T, LABELS, LOSS, GRAD, stride_s, stride_t, stride_g, V, inv_temp, ce_weight,
                        grad_scale, REVERSE: tl.constexpr, USE_CE: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_row = S + row * stride_s
        t_row = T + row * stride_t
        g_row = GRAD + row * stride_g
        neg_inf = float("-inf")
        m_s = neg_inf
        m_t = neg_inf
        z_s = 0.0
        z_t = 0.0
        e = 0.0  # running sum of exp(x - m) * (s - t) (reverse: x = s) or (t - s) (forward: x = t)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < V
            s = tl.load(s_row + cols, mask=valid, other=neg_inf).to(tl.float32) * inv_temp
            t = tl.load(t_row + cols, mask=valid, other=neg_inf).to(tl.float32) * inv_temp
            diff = tl.where(valid, s - t, 0.0)
            new_ms = tl.maximum(m_s, tl.max(s, 0))
            new_mt = tl.maximum(m_t, tl.max(t, 0))
            ws = tl.exp(s - new_ms)
            wt = tl.exp(t - new_mt)
            alpha_s = tl.exp(m_s - new_ms)
            alpha_t = tl.exp(m_t - new_mt)
            if REVERSE:
                e = e * alpha_s + tl.sum(ws * diff, 0)
            else:
                e = e * alpha_t - tl.sum(wt * diff, 0)
            z_s = z_s * alpha_s + tl.sum(ws, 0)
            z_t = z_t * alpha_t + tl.sum(wt, 0)
            m_s = new_ms
            m_t = new_mt
        lse_s = m_s + tl.log(z_s)
        lse_t = m_t + tl.log(z_t)
        if REVERSE:
            kl = e / z_s - lse_s + lse_t
        else:
            kl = e / z_t - lse_t + lse_s
        loss = (1.0 - ce_weight) * kl
        if USE_CE:
            label = tl.load(LABELS + row)
            s_label = tl.load(s_row + label).to(tl.float32) * inv_temp
            loss += ce_weight * (lse_s - s_label)
        tl.store(LOSS + row, loss)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < V
            s = tl.load(s_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
            t = tl.load(t_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
            log_q = s - lse_s
            q = tl.exp(log_q)
            if REVERSE:
                g = q * (log_q - (t - lse_t) - kl)
            else:
                g = q - tl.exp(t - lse_t)
            g = (1.0 - ce_weight) * g
            if USE_CE:
                g += ce_weight * (q - tl.where(cols == label, 1.0, 0.0))
            tl.store(g_row + cols, g * (inv_temp * grad_scale), mask=valid)


def available() -> bool:
    return triton is not None


def fused_kl_rows(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor | None, kind: str,
                  temperature: float, ce_weight: float, grad_scale: float, block_v: int = 4096):
    """See the module docstring. Rows with no vocabulary (V = 0) are rejected."""
    if triton is None:
        raise RuntimeError("fused_kl_rows: Triton is not installed; use loss.backend=torch")
    if s_logits.dim() != 2 or s_logits.shape != t_logits.shape:
        raise ValueError(f"s_logits/t_logits: expected two (n, V) tensors of one shape, got "
                         f"{tuple(s_logits.shape)} and {tuple(t_logits.shape)}")
    if s_logits.stride(1) != 1 or t_logits.stride(1) != 1:
        raise ValueError("s_logits/t_logits: the vocabulary dimension must have unit stride")
    n, vocab = s_logits.shape
    use_ce = ce_weight > 0
    if use_ce and (labels is None or labels.shape != (n,)):
        raise ValueError(f"labels: expected ({n},) int64 when ce_weight > 0, got "
                         f"{None if labels is None else tuple(labels.shape)}")
    loss = torch.empty(n, dtype=torch.float32, device=s_logits.device)
    grad = torch.empty(n, vocab, dtype=torch.float32, device=s_logits.device)
    if n == 0:
        return loss, grad
    block = min(block_v, triton.next_power_of_2(vocab))
    lab = labels if use_ce else loss  # unused pointer when CE is off
    _kl_rows_kernel[(n,)](s_logits, t_logits, lab, loss, grad, s_logits.stride(0), t_logits.stride(0),
                          grad.stride(0), vocab, 1.0 / temperature, float(ce_weight), float(grad_scale),
                          REVERSE=(kind == "reverse_kl"), USE_CE=use_ce, BLOCK_V=block, num_warps=8)
    return loss, grad
