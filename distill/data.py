"""Reasoning traces -> token rows for distillation.

Records (one JSON object per line):
    {"messages": [{"role": "user"|"system"|"assistant", "content": str}, ...]}   chat form, or
    {"prompt": str, "response": str}                                             pair form.
Each record is rendered with the teacher's chat template; only assistant tokens are scored (mixer.md 7).
Bad lines (invalid JSON, missing fields, no assistant turn) are reported as `file:line: reason`.

Rows (a `Batch`, every tensor (b, L)):
    input_ids int64, position_ids int64 (restart at 0 per document), seq_idx int32 (document index in the
    row, non-decreasing; padding is its own document), target_mask bool (True at t when token t+1 is an
    assistant token of the same document: the logits at t are scored), labels int64 (token t+1 where scored,
    else -100), attention_mask int64 (1 = real token; 0 = padding).
Layouts: "pack" concatenates documents into rows of exactly L tokens (documents longer than L are truncated,
a document never straddles two rows); "bucket" puts one document per row, right-padded, rows of similar
length batched together.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "Batch",
    "BatchStream",
    "DataError",
    "Document",
    "bucket_rows",
    "build_documents",
    "builtin_path",
    "pack_rows",
    "read_records",
    "split_records",
    "tokenize_messages",
]

DATA_DIR = Path(__file__).resolve().parent / "data"


class DataError(ValueError):
    """Raised when a data file has no usable record; the message lists every bad line as file:line."""


def builtin_path(path: str) -> Path:
    """'builtin:NAME' -> distill/data/NAME.jsonl; other strings are paths."""
    if path.startswith("builtin:"):
        return DATA_DIR / f"{path.split(':', 1)[1]}.jsonl"
    return Path(path)


def _record_messages(obj) -> list[dict[str, str]]:
    """Normalise one JSON record to a message list, or raise ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004 - a bad data line, reported as file:line
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")  # noqa: TRY004
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"messages[{i}].role must be system/user/assistant, got {m['role']!r}")
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            raise ValueError("no non-empty assistant message (nothing to score)")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in obj or "response" in obj:
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("response"), str) or not obj["response"]:
            raise ValueError("'prompt' and a non-empty 'response' must both be strings")
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    raise ValueError("expected a 'messages' list or 'prompt'/'response' strings")


def read_records(path: str | Path, *, strict: bool = False) -> list[tuple[str, list[dict[str, str]]]]:
    """Read a JSONL file -> [(\"file:line\", messages)]. Bad lines are reported on stderr (strict: raised);
    a file without any good record raises DataError listing the bad lines."""
    import sys

    path = builtin_path(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    good, bad = [], []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                good.append((where, _record_messages(json.loads(line))))
            except json.JSONDecodeError as error:
                bad.append(f"{where}: invalid JSON ({error.msg} at column {error.colno})")
            except ValueError as error:
                bad.append(f"{where}: {error}")
    if bad and (strict or not good):
        raise DataError(f"{len(bad)} bad line(s) in {path}" + (" and no usable record" if not good else "") + ":\n  "
                        + "\n  ".join(bad))
    for message in bad:
        print(f"distill: skipped bad line {message}", file=sys.stderr)
    return good


def split_records(records: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train / held-out split (at least one record on each side when possible)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * eval_fraction)) if len(records) > 1 else 0
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # A tokenizer without a template: a plain, unambiguous fallback.
    text = "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages)
    return text + ("<assistant>\n" if add_generation_prompt else "")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_messages(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and a per-token flag: True for tokens of assistant turns
    (including the template's end-of-turn tokens, which the student must also learn to emit).

    The template is rendered on growing prefixes; tokens are taken from the full rendering and a turn's
    span is located by the token count of the prefix renderings, so the ids are exactly the full chat's."""
    full_text = _render(tokenizer, messages, add_generation_prompt=False)
    ids = _encode(tokenizer, full_text)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_encode(tokenizer, _render(tokenizer, messages[:i], add_generation_prompt=True)))
        end = len(_encode(tokenizer, _render(tokenizer, messages[: i + 1], add_generation_prompt=False)))
        for t in range(min(start, len(ids)), min(end, len(ids))):
            mask[t] = True
    return ids, mask


@dataclass
class Document:
    """One tokenised record: ids, assistant flags, and where it came from (file:line)."""
    ids: list[int]
    assistant: list[bool]
    source: str


def build_documents(records, tokenizer, max_len: int) -> list[Document]:
    """Tokenise records; documents are truncated to max_len tokens; ones left with nothing to score dropped."""
    docs = []
    for source, messages in records:
        ids, mask = tokenize_messages(tokenizer, messages)
        ids, mask = ids[:max_len], mask[:max_len]
        if any(mask[1:]):
            docs.append(Document(ids, mask, source))
    return docs


@dataclass
class Batch:
    """A micro-batch of rows; see the module docstring for each field's meaning. All tensors (b, L)."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    seq_idx: torch.Tensor
    target_mask: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def select(self, rows) -> Batch:
        return Batch(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())


def _row_tensors(pieces: list[Document], seq_len: int, pad_id: int):
    ids, pos, seq, asst, real = [], [], [], [], []
    for d, doc in enumerate(pieces):
        ids += doc.ids
        pos += list(range(len(doc.ids)))
        seq += [d] * len(doc.ids)
        asst += doc.assistant
        real += [1] * len(doc.ids)
    pad = seq_len - len(ids)
    ids += [pad_id] * pad
    pos += list(range(pad))
    seq += [len(pieces)] * pad  # padding is a document of its own: never attended to by real tokens
    asst += [False] * pad
    real += [0] * pad
    return ids, pos, seq, asst, real


def _collate(rows) -> Batch:
    ids, pos, seq, asst, real = (torch.tensor(list(col)) for col in zip(*rows))
    seq = seq.to(torch.int32)
    asst = asst.bool()
    # Logits at t predict token t+1: scored when t+1 is an assistant token of the same document.
    target = torch.zeros_like(asst)
    target[:, :-1] = asst[:, 1:] & (seq[:, 1:] == seq[:, :-1])
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(target[:, :-1], ids[:, 1:], labels[:, :-1])
    return Batch(ids.long(), pos.long(), seq, target, labels, real.long())


def pack_rows(docs: list[Document], seq_len: int, pad_id: int) -> list[tuple]:
    """Greedy first-fit packing in the given order; each row holds whole documents (<= seq_len tokens)."""
    rows, current, used = [], [], 0
    for doc in docs:
        if used + len(doc.ids) > seq_len and current:
            rows.append(_row_tensors(current, seq_len, pad_id))
            current, used = [], 0
        current.append(doc)
        used += len(doc.ids)
    if current:
        rows.append(_row_tensors(current, seq_len, pad_id))
    return rows


def bucket_rows(docs: list[Document], batch_size: int, pad_id: int) -> list[list[tuple]]:
    """One document per row; documents sorted by length and batched, each batch padded to its longest."""
    ordered = sorted(docs, key=lambda d: len(d.ids))
    groups = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    return [[_row_tensors([d], max(len(g.ids) for g in group), pad_id) for d in group] for group in groups]


class BatchStream:
    """Endless, resumable stream of micro-batches, sharded over data-parallel ranks.

    Each epoch shuffles the row order (seeded by (seed, epoch)); rank r of w takes every w-th batch.
    `state_dict()` is the data position: (epoch, next batch index); `load_state_dict` resumes exactly there.
    """

    def __init__(self, docs: list[Document], *, seq_len: int, batch_size: int, layout: str, pad_id: int,
                 seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True):
        if not docs:
            raise DataError("no documents with assistant tokens to train on")
        self.batch_size, self.layout, self.pad_id = batch_size, layout, pad_id
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        if layout == "pack":
            order = list(range(len(docs)))
            random.Random(seed).shuffle(order)
            rows = pack_rows([docs[i] for i in order], seq_len, pad_id)
            self.batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        elif layout == "bucket":
            self.batches = bucket_rows(docs, batch_size, pad_id)
        else:
            raise ValueError(f"layout: expected 'pack' or 'bucket', got {layout!r}")
        # Every rank must see the same number of batches per epoch (collectives stay in step).
        usable = len(self.batches) - len(self.batches) % world if len(self.batches) >= world else len(self.batches)
        self.batches = self.batches[:max(usable, 1)]
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        return max(1, len(self.batches) // self.world)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.batches)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[self.rank::self.world] or order[:1]

    def next(self) -> Batch:
        order = self._order(self.epoch)
        if self.index >= len(order):
            self.epoch, self.index = self.epoch + 1, 0
            order = self._order(self.epoch)
        batch = _collate(self.batches[order[self.index]])
        self.index += 1
        return batch

    def all_batches(self) -> list[Batch]:
        """Every batch of this rank once, in a fixed order (held-out evaluation)."""
        return [_collate(self.batches[i]) for i in range(self.rank, len(self.batches), self.world)] or \
            [_collate(self.batches[0])]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
