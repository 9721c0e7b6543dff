"""Tiny, offline fixtures for the distill tests: a word-level tokenizer with a ChatML template, a random
4-layer Llama teacher saved as an HF directory, and synthetic arithmetic traces."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ["what", "is", "plus", "minus", "times", "so", "the", "answer", "first", "then", "we", "add", "get", "."]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + [str(n) for n in range(100)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_teacher(vocab_size: int, layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the 0.02 default: layers matter, KLs are far from zero
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 40), rng.randint(0, 40)
        reasoning = " ".join(["first", "we", "add", str(a), "plus", str(b)] * rng.randint(1, 3))
        out.append({"messages": [{"role": "user", "content": f"what is {a} plus {b}"},
                                 {"role": "assistant", "content": f"{reasoning} so the answer is {a + b} ."}]})
    return out


def write_fixture(root: Path, n_records: int = 40) -> tuple[Path, Path]:
    """Saves teacher + tokenizer under root/teacher and traces under root/traces.jsonl."""
    tok = make_tokenizer()
    teacher = make_teacher(len(tok))
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    data = root / "traces.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(n_records)))
    return root / "teacher", data
