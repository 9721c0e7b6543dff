"""Rotary position embeddings with the scaling variants Llama / Mistral / Qwen2 checkpoints use.

    RotaryEmbedding(config)(positions (b, L) int, dtype) -> (cos, sin), each (b, L, head_dim) in dtype
    apply_rotary(x (b, heads, L, head_dim), cos, sin) -> same shape

Variants (config.rope_settings["rope_type"]): None/"default", "linear" (positions / factor), "dynamic" (NTK
base stretch once a call's max position exceeds the trained length; stateless: each call decides from its
own positions, which equals transformers' choice for a single forward), "llama3" (wavelength-banded).
Frequencies are computed in fp32 and rounded to the activation dtype last, as transformers does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary", "rope_inv_freq"]

SUPPORTED = ("default", "linear", "dynamic", "llama3")


def _default_inv_freq(base: float, dim: int, device=None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def rope_inv_freq(config, device=None, seq_len: int | None = None) -> torch.Tensor:
    """inv_freq (head_dim/2,) fp32 for the config's rope type (seq_len only matters for "dynamic")."""
    dim = config.head_dim
    scaling = config.rope_settings or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in SUPPORTED:
        raise ValueError(f"rope_scaling: expected rope_type in {list(SUPPORTED)}, got {rope_type!r}")
    inv_freq = _default_inv_freq(config.rope_theta, dim, device)
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "dynamic":
        max_pos = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
        if seq_len is None or seq_len <= max_pos:
            return inv_freq
        factor = float(scaling["factor"])
        base = config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(base, dim, device)
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. Holds no buffer (nothing to save or to re-init after loading)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.dynamic = (config.rope_settings or {}).get("rope_type") == "dynamic"
        self._cache: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device, seq_len: int | None = None) -> torch.Tensor:
        if self.dynamic and seq_len is not None:
            return rope_inv_freq(self.config, device, seq_len)
        if device not in self._cache:  # filled before any CUDA-graph capture (the warm-up call does it)
            self._cache[device] = rope_inv_freq(self.config, device)
        return self._cache[device]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = int(positions.max()) + 1 if self.dynamic and positions.numel() else None
        inv_freq = self.inv_freq(positions.device, seq_len)
        freqs = positions[..., None].float() * inv_freq  # (b, L, dim/2) fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (b, heads, L, head_dim); cos/sin: (b, L, head_dim). Half-split rotation (the HF layout)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin
