"""The teacher writes the training traces: each prompt of a file is answered (greedy, batched, left-padded
generation with the KV cache) and saved as {"messages": [user, assistant], "source": "file:line"} JSONL.

    generate_traces(cfg, "builtin:prompts", "traces.jsonl", max_new_tokens=200, batch=16) -> count

Prompt files: .jsonl with a "prompt" string per line, or .txt with one prompt per non-empty line;
bad lines are reported as file:line and skipped.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .config import DistillConfig
from .data import builtin_path
from .modeling import load_teacher

__all__ = ["generate_traces", "read_prompts"]


def read_prompts(path: str) -> list[tuple[str, str]]:
    """[(\"file:line\", prompt)]; raises ValueError listing bad lines when nothing is usable."""
    p = builtin_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} does not exist")
    good, bad = [], []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(line)
                prompt = obj["prompt"] if isinstance(obj, dict) else None
            except (json.JSONDecodeError, KeyError) as error:
                bad.append(f"{where}: {type(error).__name__}: {error}")
                continue
            if not isinstance(prompt, str) or not prompt.strip():
                bad.append(f"{where}: 'prompt' must be a non-empty string")
                continue
            good.append((where, prompt))
        else:
            good.append((where, line.strip()))
    for b in bad:
        print(f"distill: skipped bad prompt line {b}", file=sys.stderr)
    if not good:
        raise ValueError(f"{p}: no usable prompt" + ("".join(f"\n  {b}" for b in bad)))
    return good


@torch.no_grad()
def greedy_batch(model, input_ids, attention_mask, max_new_tokens: int, end_ids: list[int]) -> torch.Tensor:
    """Greedy decoding of a left-padded batch with the model's KV cache; finished rows are padded with
    end_ids[0]. Returns (b, prompt + new) token ids."""
    pos = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True)
    ids, past = input_ids, out.past_key_values
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    ends = torch.tensor(end_ids, device=input_ids.device)
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, ends[0], nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, ends)
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=attention_mask, position_ids=pos, past_key_values=past,
                    use_cache=True)
        past = out.past_key_values
    return ids


@torch.no_grad()
def generate_traces(cfg: DistillConfig, prompts_path: str, out_path: str | Path, *, max_new_tokens: int = 200,
                    batch: int = 16, teacher=None, tokenizer=None, progress: bool = True) -> int:
    if teacher is None:
        teacher, tokenizer = load_teacher(cfg.model.teacher, cfg.model.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    teacher.to(device).eval()
    prompts = read_prompts(prompts_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    end_ids = [tokenizer.eos_token_id]
    if "<|im_end|>" in tokenizer.get_vocab():
        end_ids.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".jsonl.tmp")
    count = 0
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    it = chunks
    if progress:
        from tqdm import tqdm

        it = tqdm(chunks, desc="traces", dynamic_ncols=True)
    with tmp.open("w", encoding="utf-8") as fh:
        for chunk in it:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for _, p in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            prompt_len = enc["input_ids"].shape[1]
            out = greedy_batch(teacher, enc["input_ids"], enc["attention_mask"], max_new_tokens, end_ids)
            for (where, prompt), row in zip(chunk, out[:, prompt_len:]):
                answer = tokenizer.decode(row, skip_special_tokens=True).strip()
                if not answer:
                    print(f"distill: {where}: the teacher gave an empty answer; skipped", file=sys.stderr)
                    continue
                fh.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": answer}], "source": f"{Path(where).name}"}) + "\n")
                count += 1
    tmp.replace(out_path)
    return count
