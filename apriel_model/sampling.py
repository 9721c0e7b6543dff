"""Next-token choice from logits: greedy, temperature, top-k, top-p (nucleus).

    SamplingParams(max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, stop_token_ids=(), stop_strings=(),
                   seed=None)
    sample(logits (b, V), params, generator=None) -> (b,) int64
temperature 0 means greedy (argmax; ties go to the lowest id, as torch.argmax does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "sample"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick and when to stop.

    max_new_tokens: tokens generated per prompt at most.
    temperature: 0 = greedy; else logits / temperature before top-k / top-p and sampling.
    top_k: keep the k most likely tokens (0 = all).
    top_p: keep the smallest set of tokens whose probability reaches top_p (1.0 = all).
    stop_token_ids: stop after emitting any of these (None = the model's eos_token_id).
    stop_strings: stop once the decoded text contains one (needs a tokenizer); the text is cut before it.
    seed: seeds the sampling generator (None = torch's global RNG).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (b, V) any float dtype -> (b,) int64 token ids."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
