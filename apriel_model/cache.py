"""Static inference cache of a hybrid model, addressed by sequence slots.

    HybridCache(config, max_batch, max_seqlen, device, dtype, ssm_dtype=None)
        keys[l], values[l]: (slots, kv_heads, max_seqlen, head_dim) dtype      for attention layers "t"
        conv[l]: (slots, d_xb, d_conv - 1) dtype   pre-conv x window, oldest first (the compact layout)
        ssm[l]:  (slots, d_inner / d_state, d_state, d_state) fp32 (or bf16: config.ssm_state_dtype)
        lengths: (slots,) int64    tokens stored per slot (the next write index)
        key_valid: (slots, max_seqlen) bool    which stored positions are real tokens (left padding: False)

Every tensor is allocated once; decode writes in place, so a CUDA graph of the decode step stays valid.
A slot is made empty with `reset(slots)` (zero states, length 0) before a new sequence uses it.
"""
from __future__ import annotations

import torch

__all__ = ["HybridCache"]


class HybridCache:
    """KV for attention layers and conv/SSM state for mixer layers, per sequence slot."""

    is_compileable = False

    def __init__(self, config, max_batch: int, max_seqlen: int, device=None, dtype=torch.float32,
                 ssm_dtype: torch.dtype | None = None):
        if max_batch <= 0 or max_seqlen <= 0:
            raise ValueError(f"max_batch, max_seqlen: expected positive ints, got {max_batch}, {max_seqlen}")
        self.config = config
        self.max_batch, self.max_seqlen = max_batch, max_seqlen
        self.device, self.dtype = torch.device(device) if device is not None else torch.device("cpu"), dtype
        if ssm_dtype is None:
            ssm_dtype = torch.bfloat16 if getattr(config, "ssm_state_dtype", "float32") == "bfloat16" else torch.float32
        self.ssm_dtype = ssm_dtype
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        kv_shape = (max_batch, config.num_key_value_heads, max_seqlen, config.head_dim)
        for i, code in enumerate(config.hybrid_block_layout):
            if code == "t":
                self.keys[i] = torch.zeros(kv_shape, device=self.device, dtype=dtype)
                self.values[i] = torch.zeros(kv_shape, device=self.device, dtype=dtype)
            elif code == "m2":
                d_inner, d_xb, d_state, _, d_conv = config.mixer_dims()
                self.conv[i] = torch.zeros(max_batch, d_xb, d_conv - 1, device=self.device, dtype=dtype)
                self.ssm[i] = torch.zeros(max_batch, d_inner // d_state, d_state, d_state, device=self.device,
                                          dtype=ssm_dtype)
        self.lengths = torch.zeros(max_batch, dtype=torch.int64, device=self.device)
        self.key_valid = torch.zeros(max_batch, max_seqlen, dtype=torch.bool, device=self.device)

    # ------------------------------------------------------------------------------------------ slots
    def reset(self, slots: list[int] | torch.Tensor | None = None) -> None:
        """Empty the given slots (all when None): zero states, length 0, no valid keys."""
        idx = slice(None) if slots is None else torch.as_tensor(slots, dtype=torch.long, device=self.device)
        for t in (*self.conv.values(), *self.ssm.values()):
            t[idx] = 0
        self.lengths[idx] = 0
        self.key_valid[idx] = False

    def grow(self, max_seqlen: int) -> None:
        """Reallocate the KV capacity to max_seqlen tokens, keeping contents (eager use only: it replaces the
        tensors a captured CUDA graph would point at)."""
        if max_seqlen <= self.max_seqlen:
            return
        for store in (self.keys, self.values):
            for i, t in store.items():
                bigger = t.new_zeros(t.shape[0], t.shape[1], max_seqlen, t.shape[3])
                bigger[:, :, : self.max_seqlen] = t
                store[i] = bigger
        valid = self.key_valid.new_zeros(self.max_batch, max_seqlen)
        valid[:, : self.max_seqlen] = self.key_valid
        self.key_valid, self.max_seqlen = valid, max_seqlen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens stored in slot 0 (what transformers' generate() asks of a cache)."""
        return int(self.lengths[0])

    def memory_bytes(self) -> int:
        tensors = [*self.keys.values(), *self.values.values(), *self.conv.values(), *self.ssm.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def bytes_per_slot(self, context: int) -> int:
        """Cache bytes one decode step reads for a sequence of `context` tokens (the bandwidth model)."""
        kv = sum(2 * t.shape[1] * context * t.shape[3] * t.element_size() for t in self.keys.values())
        state = sum(t[0].numel() * t.element_size() for t in (*self.conv.values(), *self.ssm.values()))
        return kv + 2 * state  # states are read and written back
