"""Decode attention through torch SDPA: one query token per sequence, GQA without repeating K/V.

The engine's GPU default is apriel_kernels.decode_attention (a split-K Triton kernel, faster at every
measured batch, see docs/model.md); this module is the SDPA path (CPU, and decode_attention="sdpa").

    decode_attention(q (b, kv, g, d), keys (b, kv, Lk, d), values (b, kv, Lk, d), valid (b, Lk) bool,
                     scale, splits=0) -> (b, kv, g, d)

The g query heads of a KV head form a (g, d) query block. splits <= 1: one SDPA call (the fused kernels
give one thread block per (sequence, kv head): at decode batch sizes that leaves most SMs idle while each
block streams a whole 16k-token cache). splits = s > 1 (CUDA): split-K ("flash-decoding") - the key axis is
cut into s chunks viewed as s times more heads (a free reshape of the cache), the memory-efficient SDPA
kernel returns each chunk's output and log-sum-exp, and the chunks are merged with softmax weights. Chunks
with no valid key (beyond a sequence's length) get weight 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["decode_attention", "pick_splits"]


def pick_splits(batch: int, kv_heads: int, max_seqlen: int, sms: int) -> int:
    """Smallest power of two giving >= 2 blocks per SM, chunks of >= 512 keys that are multiples of 16.

    No split once the fused kernel alone has a block for at least half the SMs: measured on the H100
    (apriel-15b, 16k context, batch 15 x 8 kv heads = 120 blocks), split-K through the memory-efficient
    kernel ran the whole decode step at 63% of its bandwidth bound, the unsplit fused (cuDNN) call at 82%.
    """
    if batch * kv_heads >= sms // 2:
        return 1
    s = 1
    while batch * kv_heads * s < 2 * sms and max_seqlen % (2 * s * 16) == 0 and max_seqlen // (2 * s) >= 512:
        s *= 2
    return s


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scale: float,
                     splits: int = 0, memo: dict | None = None) -> torch.Tensor:
    """See the module docstring. memo: a per-step dict where the mask-derived tensors are kept, so the
    layers of one decode step build them once."""
    b, kv, g, d = q.shape
    lk = keys.shape[2]
    if splits <= 1 or not q.is_cuda or lk % (splits * 16):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=valid[:, None, None, :], scale=scale)
    chunk = lk // splits
    k = keys.reshape(b, kv * splits, chunk, d)  # a view: (kv, Lk) -> (kv * splits, chunk)
    v = values.reshape(b, kv * splits, chunk, d)
    qs = q[:, :, None].expand(b, kv, splits, g, d).reshape(b, kv * splits, g, d)
    key = ("split", splits, kv, g, q.dtype)
    if memo is not None and key in memo:
        bias, any_valid = memo[key]
    else:
        neg = torch.finfo(q.dtype).min
        bias = torch.zeros(b, 1, splits, chunk, dtype=q.dtype, device=q.device).masked_fill_(
            ~valid.view(b, 1, splits, chunk), neg)
        bias = bias.expand(b, kv, splits, chunk).reshape(b, kv * splits, 1, chunk).expand(b, kv * splits, g, chunk)
        bias = bias.contiguous()  # the kernel wants a dense, 16-aligned bias
        # -inf for chunks with no valid key: their (finite, meaningless) partial results get weight 0
        empty = valid.view(b, 1, splits, chunk).any(-1, keepdim=True).logical_not()  # (b, 1, splits, 1)
        any_valid = torch.zeros(empty.shape, dtype=torch.float32, device=q.device).masked_fill_(empty, float("-inf"))
        if memo is not None:
            memo[key] = (bias, any_valid)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qs, k, v, bias, True, scale=scale)[:2]
    # weights over chunks (some chunk always holds the current token's key, so a row never is all -inf)
    weights = torch.softmax(lse[..., :g].view(b, kv, splits, g) + any_valid, dim=2)
    merged = (out.view(b, kv, splits, g, d) * weights[..., None]).sum(dim=2)  # bf16 * fp32 -> fp32, one kernel
    return merged.to(q.dtype)
