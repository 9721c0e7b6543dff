"""One-token GQA attention over a KV cache (the attention half of a hybrid decode step).

    decode_attention(q, keys, values, valid, scale=None, *, kv_stop=None, slots=None, splits=0)
        q:       (b, kv, g, d) fp16 | bf16 | fp32 | fp64 - the g query heads that share each of the kv heads
                 (a (b, kv*g, 1, d) query viewed as (b, kv, g, d); any strides with a unit last one);
        keys, values: (rows, kv, Lk, d), q's dtype, unit last stride (a slice of a longer cache is fine);
        valid:   (b, Lk) bool - True = sequence b may attend key j;
        scale:   softmax scale (default d ** -0.5);
        kv_stop: optional (b,) int32/int64 - keys j >= kv_stop[b] are skipped (not read), as if invalid;
        slots:   optional (b,) int32/int64 - cache row of sequence b (default row b); -1 = padding row;
        splits:  key chunks per (sequence, kv head) on CUDA; 0 = picked from the grid (see _triton_decode).
        Returns (b, kv, g, d) in q's dtype. A row with no attended key (or a padding row) returns zeros.

Op: apriel::decode_attention. CPU (and fp64) runs the reference below; CUDA runs the split-K Triton kernel
(apriel_kernels._triton_decode: each cached K/V byte read once for the g query heads, only up to kv_stop,
chunks merged by log-sum-exp), or the reference when Triton is missing. CUDA-graph capturable (the
partials are allocated from the graph's pool; no host sync) and opaque to torch.compile.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _triton_decode as _td
from . import _validate as V

__all__ = ["decode_attention", "decode_attention_ref"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def decode_attention_ref(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float,
                         kv_stop: Tensor | None = None, slots: Tensor | None = None) -> Tensor:
    """Masked softmax attention in fp32 (fp64 for fp64 inputs); same contract as decode_attention."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, lk = valid.shape
    mask = valid.bool()
    if kv_stop is not None:
        mask = mask & (torch.arange(lk, device=q.device)[None, :] < kv_stop.to(q.device)[:, None])
    if slots is not None:
        rows = slots.long()
        mask = mask & (rows >= 0)[:, None]
        rows = rows.clamp(min=0)
        keys, values = keys[rows], values[rows]
    else:
        keys, values = keys[:b], values[:b]
    scores = torch.einsum("bhgd,bhnd->bhgn", q.to(acc), keys.to(acc)) * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key: all -inf -> NaN -> 0
    return torch.einsum("bhgn,bhnd->bhgd", probs, values.to(acc)).to(q.dtype)


@torch.library.custom_op("apriel::decode_attention", mutates_args=())
def decode_attention_op(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float,
                        kv_stop: Optional[Tensor], slots: Optional[Tensor], splits: int) -> Tensor:
    if q.is_cuda and q.dtype != torch.float64 and _td.available():
        b, kv = q.shape[:2]
        if splits <= 0:
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            splits = _td.pick_splits(b * kv, keys.shape[2], sms)
        valid_u8 = valid.view(torch.uint8) if valid.stride(-1) == 1 else valid.contiguous().view(torch.uint8)
        out_part, lse_part = _td.partials(q, keys, values, valid_u8, kv_stop, slots, scale, splits)
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        _td.merge(out_part, lse_part, out)
        return out
    return decode_attention_ref(q, keys, values, valid, scale, kv_stop, slots).contiguous()


@decode_attention_op.register_fake
def _(q, keys, values, valid, scale, kv_stop, slots, splits):
    return q.new_empty(q.shape)


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float | None = None, *,
                     kv_stop: Tensor | None = None, slots: Tensor | None = None, splits: int = 0) -> Tensor:
    """See the module docstring for the shape contract."""
    sizes = V.Sizes()
    V.check_tensor("q", q, ("batch", "kv_heads", "group", "head_dim"), V.FLOAT_DTYPES, sizes=sizes,
                   last_dim_contiguous=True)
    dev = q.device
    for name, t in (("keys", keys), ("values", values)):
        V.check_tensor(name, t, (None, "kv_heads", "kv_len", "head_dim"), (q.dtype,), device=dev, sizes=sizes,
                       last_dim_contiguous=True)
    V.check_tensor("valid", valid, ("batch", "kv_len"), (torch.bool,), device=dev, sizes=sizes)
    V.check_tensor("kv_stop", kv_stop, ("batch",), _INDEX_DTYPES, device=dev, sizes=sizes, optional=True)
    V.check_tensor("slots", slots, ("batch",), _INDEX_DTYPES, device=dev, sizes=sizes, optional=True)
    if keys.shape[0] != values.shape[0]:
        raise ValueError(f"values: expected {keys.shape[0]} cache rows (like keys), got {values.shape[0]}")
    if slots is None and keys.shape[0] < q.shape[0]:
        raise ValueError(f"keys: expected at least batch = {q.shape[0]} rows when slots is None, got {keys.shape[0]}")
    if slots is not None and not (torch.compiler.is_compiling() or (slots.is_cuda and torch.cuda.is_current_stream_capturing())):
        V.check_index_range("slots", slots, keys.shape[0])  # a host read: skipped under capture / compile
    if not isinstance(splits, int) or splits < 0:
        raise ValueError(f"splits: expected an int >= 0 (0 = auto), got {splits!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not scale > 0:
        raise ValueError(f"scale: expected a positive float, got {scale}")
    return decode_attention_op(q, keys, values, valid, float(scale), kv_stop, slots, splits)
