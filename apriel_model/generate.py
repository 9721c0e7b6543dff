"""Text in, text out: the convenience layer over Engine (tokenizer, chat template, streaming).

    generate(model, tokenizer, prompts: list[str], max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
             stop=(), chat=True, seed=None, engine=None, on_token=None) -> list[str]
on_token(row, text_piece) is called as tokens arrive (streaming). With chat=True each prompt is wrapped
as one user turn by the tokenizer's chat template (when it has one).
"""
from __future__ import annotations

from collections.abc import Callable

from .engine import Engine
from .sampling import SamplingParams

__all__ = ["encode_prompts", "generate"]


def encode_prompts(tokenizer, prompts: list[str], chat: bool = True) -> list[list[int]]:
    if isinstance(prompts, str):
        raise TypeError("prompts: expected a list of strings, got one string")
    out = []
    for text in prompts:
        if chat and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        out.append(list(ids))
    return out


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop: tuple[str, ...] = (), chat: bool = True,
             seed: int | None = None, engine: Engine | None = None,
             on_token: Callable[[int, str], None] | None = None) -> list[str]:
    """Generate a completion per prompt (batched); returns the texts."""
    ids = encode_prompts(tokenizer, prompts, chat)
    if engine is None:
        longest = max(len(p) for p in ids)
        engine = Engine(model, max_batch=min(len(ids), 16), max_seqlen=longest + max_new_tokens + 1)
    stop_ids = None
    if tokenizer.eos_token_id is not None:
        eos = model.config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        stop_ids = tuple(sorted({tokenizer.eos_token_id, *eos}))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_token_ids=stop_ids, stop_strings=tuple(stop), seed=seed)
    texts = [""] * len(ids)
    for ev in engine.stream(ids, params, tokenizer):
        texts[ev.row] += ev.text
        if on_token is not None and ev.text:
            on_token(ev.row, ev.text)
    return texts
