"""Distillation losses computed in token chunks straight from the final hidden states.

    loss, stats = distill_loss(h_student, w_student, h_teacher, w_teacher, labels, kind="reverse_kl",
                               temperature=1.0, ce_weight=0.0, chunk_tokens=1024, backend="auto")
        h_student: (n, H) final hidden states of the scored tokens (requires grad);
        w_student: (V, H) student lm_head weight (grad accumulated when it requires grad);
        h_teacher: (n, H_t), w_teacher: (V, H_t) (never differentiated);
        labels: (n,) int64 next-token ids (CE term and NLL statistic).
        Returns the mean loss over the n tokens (a 0-dim tensor with autograd) and detached sums
        {"kl", "rev_kl", "top1", "nll", "tokens"} for logging.

Objectives (mixer.md 7): reverse KL(q_student || p_teacher) (default), forward KL(p || q), and
(1 - ce_weight) KL + ce_weight CE, each at temperature T on both logits.

Memory: the lm_head products, both softmaxes and the logit gradient exist for `chunk_tokens` rows at a
time only; the gradient w.r.t. the hidden states (and lm_head) is computed inside the forward, chunk by
chunk, and replayed in the backward (the Liger fused-linear-cross-entropy trick), so full (n, V) fp32
logits of either model never exist. Per chunk the kernel is `kl_triton.fused_kl_rows` on CUDA and
`kl_rows_torch` (the reference) elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kl_triton

__all__ = ["distill_loss", "kl_rows_torch", "reference_loss"]


def kl_rows_torch(s_logits, t_logits, labels, kind: str, temperature: float, ce_weight: float, grad_scale: float):
    """Torch version of kl_triton.fused_kl_rows (same contract): per-row loss and grad_scale * dloss/ds."""
    f = torch.float64 if s_logits.dtype == torch.float64 else torch.float32
    s = s_logits.to(f) / temperature
    t = t_logits.to(f) / temperature
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    q = log_q.exp()
    if kind == "reverse_kl":
        kl = (q * (log_q - log_p)).sum(-1)
        grad = q * (log_q - log_p - kl[:, None])
    elif kind == "forward_kl":
        p = log_p.exp()
        kl = (p * (log_p - log_q)).sum(-1)
        grad = q - p
    else:
        raise ValueError(f"kind: expected 'reverse_kl' or 'forward_kl', got {kind!r}")
    loss = (1.0 - ce_weight) * kl
    grad = (1.0 - ce_weight) * grad
    if ce_weight > 0:
        loss = loss + ce_weight * (-log_q.gather(1, labels[:, None]).squeeze(1))
        grad = grad + ce_weight * (q - F.one_hot(labels, s.shape[-1]).to(q.dtype))
    return loss, grad * (grad_scale / temperature)


def _row_kernel(backend: str, device: torch.device):
    if backend == "triton" or (backend == "auto" and device.type == "cuda" and kl_triton.available()):
        return kl_triton.fused_kl_rows
    return kl_rows_torch


def _chunk_stats(s_logits, t_logits, labels, loss_rows, kind, temperature, ce_weight):
    """Sums over a chunk: [objective KL, reverse KL at T=1, top-1 agreement, NLL of labels, tokens].
    The kernel's row losses are reused when they already are the statistic (the default objective)."""
    f = torch.float64 if s_logits.dtype == torch.float64 else torch.float32
    s, t = s_logits.to(f), t_logits.to(f)
    lse_s = torch.logsumexp(s, -1)
    nll = (lse_s - s.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)).double().sum()
    if ce_weight == 0 and temperature == 1.0:
        kl = loss_rows.double().sum()
        rev = kl if kind == "reverse_kl" else None
    else:
        kl = None
    if kl is None or rev is None:
        log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
        rev = (log_q.exp() * (log_q - log_p)).sum(-1).double().sum()
        if kl is None:
            sq, tp = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
            kl = ((sq.exp() * (sq - tp)) if kind == "reverse_kl" else (tp.exp() * (tp - sq))).sum(-1).double().sum()
    top1 = (s.argmax(-1) == t.argmax(-1)).double().sum()
    return torch.stack([kl, rev, top1, nll, torch.tensor(float(s.shape[0]), dtype=torch.float64, device=s.device)])


class _ChunkedDistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, kind, temperature, ce_weight, chunk, backend):
        n = h_s.shape[0]
        kernel = _row_kernel(backend, h_s.device)
        need_w = ctx.needs_input_grad[1]
        f = torch.float64 if h_s.dtype == torch.float64 else torch.float32
        grad_h = torch.empty_like(h_s) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w_s, dtype=f) if need_w else None
        total = torch.zeros((), dtype=f, device=h_s.device)
        stats = torch.zeros(5, dtype=torch.float64, device=h_s.device)  # kl, rev_kl, top1, nll, tokens
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            s_logits = h_s[sl] @ w_s.t()
            with torch.no_grad():
                t_logits = h_t[sl] @ w_t.t()
            loss_rows, g = kernel(s_logits.detach(), t_logits, labels[sl], kind, temperature, ce_weight, 1.0 / n)
            total += loss_rows.sum()
            with torch.no_grad():
                stats += _chunk_stats(s_logits, t_logits, labels[sl], loss_rows, kind, temperature, ce_weight)
            g = g.to(h_s.dtype)
            if grad_h is not None:
                grad_h[sl] = g @ w_s
            if need_w:
                grad_w += (g.t() @ h_s[sl]).to(f)
        ctx.save_for_backward(grad_h if grad_h is not None else h_s.new_empty(0),
                              grad_w if grad_w is not None else h_s.new_empty(0))
        ctx.has = (grad_h is not None, need_w)
        ctx.w_dtype = w_s.dtype
        ctx.mark_non_differentiable(stats)
        return total / max(n, 1), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_loss.to(grad_h.dtype) if ctx.has[0] else None
        dw = (grad_w * grad_loss).to(ctx.w_dtype) if ctx.has[1] else None
        return dh, dw, None, None, None, None, None, None, None, None


def _check(h_s, w_s, h_t, w_t, labels):
    if h_s.dim() != 2 or w_s.dim() != 2 or h_s.shape[1] != w_s.shape[1]:
        raise ValueError(f"h_student/w_student: expected (n, H) and (V, H), got {tuple(h_s.shape)} and {tuple(w_s.shape)}")
    if h_t.dim() != 2 or w_t.dim() != 2 or h_t.shape[1] != w_t.shape[1] or h_t.shape[0] != h_s.shape[0]:
        raise ValueError(f"h_teacher/w_teacher: expected (n={h_s.shape[0]}, H_t) and (V, H_t), got "
                         f"{tuple(h_t.shape)} and {tuple(w_t.shape)}")
    if w_t.shape[0] != w_s.shape[0]:
        raise ValueError(f"w_teacher: expected the student's vocabulary {w_s.shape[0]}, got {w_t.shape[0]}")
    if labels.shape != (h_s.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"labels: expected ({h_s.shape[0]},) int64, got {tuple(labels.shape)} {labels.dtype}")


def distill_loss(h_student, w_student, h_teacher, w_teacher, labels, *, kind: str = "reverse_kl",
                 temperature: float = 1.0, ce_weight: float = 0.0, chunk_tokens: int = 1024,
                 backend: str = "auto"):
    """Chunked fused lm_head + distillation loss; see the module docstring."""
    _check(h_student, w_student, h_teacher, w_teacher, labels)
    if kind not in ("reverse_kl", "forward_kl"):
        raise ValueError(f"kind: expected 'reverse_kl' or 'forward_kl', got {kind!r}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens: expected > 0, got {chunk_tokens}")
    loss, stats = _ChunkedDistillLoss.apply(h_student, w_student, h_teacher.detach(), w_teacher.detach(), labels,
                                            kind, float(temperature), float(ce_weight), int(chunk_tokens), backend)
    names = ("kl", "rev_kl", "top1", "nll", "tokens")
    return loss, dict(zip(names, stats.tolist()))


def reference_loss(h_student, w_student, h_teacher, w_teacher, labels, *, kind="reverse_kl", temperature=1.0,
                   ce_weight=0.0):
    """Unchunked autograd formulation (tests only: it materialises the full logits)."""
    f = torch.float64 if h_student.dtype == torch.float64 else torch.float32
    s = (h_student @ w_student.t()).to(f) / temperature
    t = (h_teacher @ w_teacher.t()).to(f) / temperature
    log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if kind == "reverse_kl":
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    loss = (1 - ce_weight) * kl
    if ce_weight > 0:
        loss = loss + ce_weight * F.cross_entropy(s, labels, reduction="none")
    return loss.mean()
