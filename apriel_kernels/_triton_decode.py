"""Split-K ("flash-decoding") GQA decode attention in Triton (GPU; also runs under TRITON_INTERPRET=1).

    partials(q, keys, values, valid, kv_stop, slots, scale, splits, block_n, num_warps, num_stages)
        -> out_part (b*kv, splits, g, d) fp32, lse_part (b*kv, splits, g) fp32 (log2 units)
    merge(out_part, lse_part, out (b, kv, g, d))  writes the softmax-weighted sum over splits

Why a kernel of our own: torch's fused SDPA kernels give one thread block per (sequence, kv head) and
stream the whole cache in it. At the batch sizes a 16k-token decode runs at (15-71 sequences x 8 kv heads =
120-568 blocks on 132 SMs) the last wave is mostly empty: cuDNN ran the apriel-15b H1-30 decode (batch 36)
at 77 % of the copy bandwidth. Here a program is (sequence, kv head, key chunk): `splits` chunks per row
turn a 1-2 wave grid into many waves, so the tail costs little. The g query heads of a KV head form one
(g, d) block padded to 16 rows for tl.dot, so each cached K/V byte is read once for all of them (GQA
without a repeat). kv_stop (per row) bounds the keys read: a batch of short and long sequences reads only
what each needs, where SDPA reads every row to the cache's end.

Program (split s, row b, kv head h): keys [s*chunk, min((s+1)*chunk, kv_stop[b])) of cache row
slots[b] (or b) in tiles of BLOCK_N; online softmax in base 2 (scale folded with log2 e); invalid keys
(valid[b, j] == 0) get -inf. A chunk with no valid key writes lse = -inf and out = 0, which the merge
weights 0; a row with no valid key at all (or slot -1, a padding row) gets out = 0.
"""
from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - machines without Triton use the torch path
    triton = None

LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _decode_partial_kernel(Q, K, V, VALID, STOP, SLOTS, OP, LSE,
                               stride_qb, stride_qh, stride_qg,
                               stride_kb, stride_kh, stride_kn,
                               stride_vb, stride_vh, stride_vn,
                               stride_valid_b, Lk, chunk, scale_log2, SPLITS,
                               KV_HEADS: tl.constexpr, G: tl.constexpr,
                               BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_N: tl.constexpr, HAS_STOP: tl.constexpr, HAS_SLOTS: tl.constexpr,
                               IEEE: tl.constexpr):
        split = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // KV_HEADS
        h = bh % KV_HEADS
        lo = split * chunk
        hi = tl.minimum(lo + chunk, Lk)
        if HAS_STOP:
            hi = tl.minimum(hi, tl.load(STOP + b).to(tl.int32))
        if HAS_SLOTS:
            row = tl.load(SLOTS + b).to(tl.int64)
            hi = tl.where(row < 0, lo, hi)  # padding row (-1): reads nothing, writes zeros
            row = tl.maximum(row, 0)
        else:
            row = b.to(tl.int64)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < D
        q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
                    mask=(offs_g[:, None] < G) & d_ok[None, :], other=0.0)
        k_base = K + row * stride_kb + h * stride_kh
        v_base = V + row * stride_vb + h * stride_vh
        valid_base = VALID + b.to(tl.int64) * stride_valid_b

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + offs_n
            in_range = n < hi
            k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None] & d_ok[None, :],
                        other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            ok = in_range & (tl.load(valid_base + n, mask=in_range, other=0) != 0)
            s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: exp2(-inf) = 0, no NaN
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None] & d_ok[None, :],
                        other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        part = bh.to(tl.int64) * SPLITS + split
        g_ok = offs_g < G
        tl.store(OP + (part * G + offs_g[:, None]) * D + offs_d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(LSE + part * G + offs_g, lse, mask=g_ok)

    @triton.jit
    def _decode_merge_kernel(OP, LSE, OUT, stride_ob, stride_oh, stride_og, SPLITS,
                             KV_HEADS: tl.constexpr, G: tl.constexpr,
                             BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // KV_HEADS
        h = bh % KV_HEADS
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok = offs_g < G
        mask = g_ok[:, None] & (offs_d[None, :] < D)
        base = bh.to(tl.int64) * SPLITS
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        for s in range(SPLITS):
            m = tl.maximum(m, tl.load(LSE + (base + s) * G + offs_g, mask=g_ok, other=float("-inf")))
        m = tl.where(m == float("-inf"), 0.0, m)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        wsum = tl.zeros([BLOCK_G], tl.float32)
        for s in range(SPLITS):
            w = tl.exp2(tl.load(LSE + (base + s) * G + offs_g, mask=g_ok, other=float("-inf")) - m)
            o = tl.load(OP + ((base + s) * G + offs_g[:, None]) * D + offs_d[None, :], mask=mask, other=0.0)
            acc += w[:, None] * o
            wsum += w
        acc = acc / tl.where(wsum > 0.0, wsum, 1.0)[:, None]
        tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + offs_g[:, None] * stride_og + offs_d[None, :],
                 acc.to(OUT.dtype.element_ty), mask=mask)


def available() -> bool:
    return triton is not None


def pick_splits(rows: int, lk: int, sms: int, programs_per_sm: int = 8, min_chunk: int = 256) -> int:
    """Key chunks per (sequence, kv head): the smallest power of two giving >= programs_per_sm programs per
    SM (so the last partial wave is a small share of the work), with chunks of >= min_chunk keys.

    Measured on the H100 (apriel-15b heads, 16k keys, bf16; bench/results/s3/decode_attn_h100.json): the
    best split gives 8-18 programs per SM at batch 15 / 36 / 71 (s = 16 / 4 / 2: 338 / 774 / 1511 us,
    98-105 % of the copy ceiling); one split at batch 15 (120 programs) runs at 79 %, and 32 splits lose
    2-4 % to the merge and per-program prologues."""
    s = 1
    while rows * s < programs_per_sm * sms and lk // (2 * s) >= min_chunk:
        s *= 2
    return s


def partials(q, keys, values, valid_u8, kv_stop, slots, scale: float, splits: int, block_n: int = 64,
             num_warps: int = 4, num_stages: int = 3):
    """Launch the partial kernel. Shapes as in the module docstring; valid_u8 (b, Lk) uint8 unit stride."""
    b, kv, g, d = q.shape
    lk = keys.shape[2]
    chunk = -(-lk // splits)
    chunk = -(-chunk // block_n) * block_n  # whole tiles per chunk
    splits = -(-lk // chunk)
    out_part = torch.empty(b * kv, splits, g, d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(b * kv, splits, g, device=q.device, dtype=torch.float32)
    block_g = max(16, triton.next_power_of_2(g))
    block_d = triton.next_power_of_2(d)
    dummy = valid_u8
    _decode_partial_kernel[(splits, b * kv)](
        q, keys, values, valid_u8, kv_stop if kv_stop is not None else dummy, slots if slots is not None else dummy,
        out_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        valid_u8.stride(0), lk, chunk, scale * LOG2E, splits,
        KV_HEADS=kv, G=g, BLOCK_G=block_g, D=d, BLOCK_D=block_d, BLOCK_N=block_n,
        HAS_STOP=kv_stop is not None, HAS_SLOTS=slots is not None, IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    return out_part, lse_part


def merge(out_part, lse_part, out) -> None:
    """Softmax-weighted sum of the chunks' outputs into out (b, kv, g, d), any float dtype, unit last stride."""
    b, kv, g, d = out.shape
    splits = out_part.shape[1]
    _decode_merge_kernel[(b * kv,)](
        out_part, lse_part, out, out.stride(0), out.stride(1), out.stride(2), splits,
        KV_HEADS=kv, G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d,
        BLOCK_D=triton.next_power_of_2(d), num_warps=4)
