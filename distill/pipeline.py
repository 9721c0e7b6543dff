"""Setup shared by the commands: seeding, teacher + tokenizer, trace data -> train stream + held-out batches,
the student (converted by ranking, or loaded), and the ranking itself (loaded or computed by LOO).
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import torch

from . import distributed as D
from .config import DistillConfig
from .data import BatchStream, build_documents, read_records, split_records
from .modeling import convert, layers_of, load_teacher

__all__ = ["Setup", "build_student", "layout_for", "prepare", "ranking_order", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


class Setup:
    """teacher, tokenizer, train stream, held-out batches, distributed info."""

    def __init__(self, teacher, tokenizer, stream: BatchStream, eval_batches, info: D.DistInfo):
        self.teacher, self.tokenizer, self.stream, self.eval_batches, self.info = teacher, tokenizer, stream, eval_batches, info

    def fresh_stream(self) -> BatchStream:
        """A copy of the train stream at its start (each stage / candidate starts from the same data)."""
        s = self.stream
        clone = object.__new__(BatchStream)
        clone.__dict__.update(s.__dict__)
        clone.epoch, clone.index = 0, 0
        return clone


def prepare(cfg: DistillConfig, info: D.DistInfo | None = None, teacher=None, tokenizer=None) -> Setup:
    info = info or D.init(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    if teacher is None:
        teacher, tokenizer = load_teacher(cfg.model.teacher, cfg.model.dtype)
    d = cfg.data
    records = read_records(d.train_path)
    if d.eval_path:
        train_records, eval_records = records, read_records(d.eval_path)
    else:
        train_records, eval_records = split_records(records, d.eval_fraction, d.seed)
    pad = pad_id_of(tokenizer)
    train_docs = build_documents(train_records, tokenizer, d.seq_len)
    eval_docs = build_documents(eval_records, tokenizer, d.seq_len)
    stream = BatchStream(train_docs, seq_len=d.seq_len, batch_size=d.batch_size, layout=d.layout, pad_id=pad,
                         seed=d.seed, rank=info.rank, world=info.world)
    eval_stream = BatchStream(eval_docs, seq_len=d.seq_len, batch_size=d.batch_size, layout=d.layout, pad_id=pad,
                              seed=d.seed, rank=info.rank, world=info.world, shuffle=False)
    eval_batches, rows = [], 0
    for b in eval_stream.all_batches():
        if rows >= d.max_eval_rows:
            break
        take = min(b.input_ids.shape[0], d.max_eval_rows - rows)
        eval_batches.append(b.select(slice(0, take)))
        rows += take
    if info.is_main:
        print(f"distill: {len(train_docs)} train / {len(eval_docs)} held-out documents, {len(stream)} batches per "
              f"epoch of {d.batch_size} x {d.seq_len} ({d.layout}); {rows} held-out rows scored", file=sys.stderr)
    return Setup(teacher, tokenizer, stream, eval_batches, info)


def ranking_order(cfg: DistillConfig, setup: Setup, out_dir: Path) -> tuple[list[int], dict]:
    """The replace-first order of layers: from model.ranking, else LOO on the held-out batches (saved)."""
    from .ranking import load_ranking, loo_scores, make_ranking, save_ranking

    n_layers = len(layers_of(setup.teacher))
    if cfg.model.ranking:
        ranking = load_ranking(cfg.model.ranking, n_layers)
        return ranking["order"], ranking
    rows = setup.eval_batches[: max(1, -(-cfg.rank.eval_rows // cfg.data.batch_size))]
    rows = [b.select(slice(0, cfg.rank.eval_rows)) for b in rows]
    scores = loo_scores(setup.teacher, rows, setup.info.device, score=cfg.rank.score,
                        chunk_tokens=cfg.loss.chunk_tokens, progress=cfg.train.progress and setup.info.is_main)
    ranking = make_ranking("loo", cfg.rank.score, scores, n_layers, cfg.model.teacher)
    if setup.info.is_main:
        save_ranking(cfg.rank.out or out_dir / "ranking.json", ranking)
    return ranking["order"], ranking


def layout_for(order: list[int], num_mixers: int, num_layers: int) -> list[str]:
    """All attention, with the first `num_mixers` layers of `order` as mixers."""
    if num_mixers > len(order):
        raise ValueError(f"model.num_mixers={num_mixers}: the ranking orders only {len(order)} layers")
    layout = ["t"] * num_layers
    for layer in order[:num_mixers]:
        layout[layer] = "m2"
    return layout


def build_student(cfg: DistillConfig, setup: Setup, order: list[int] | None):
    """model.student if given, else the teacher converted to model.num_mixers mixers along `order`."""
    if cfg.model.student:
        from .modeling import load_teacher as load_model

        student, _ = load_model(cfg.model.student, cfg.model.dtype)
        return student
    layout = layout_for(order, cfg.model.num_mixers, len(layers_of(setup.teacher)))
    torch.manual_seed(cfg.train.seed)
    return convert(setup.teacher, layout, mil_mapping=cfg.model.mil_mapping, seed=cfg.train.seed)
