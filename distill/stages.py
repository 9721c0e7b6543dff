"""Staged conversion (mixer.md 7): a schedule of mixer counts, e.g. 8 -> 12 -> 15 of 30 (embedded) or
25 -> 27 -> 30 -> 34 -> 37 -> 40 of 50 (Apriel-H1 15B). Stage k converts the next layers of the ranking
(MIL-initialised from the teacher's attention), keeps every weight the previous stage trained, and
distills for train.steps steps in <out_dir>/stage_<k>_<mixers>/ (its own checkpoints, so a killed run
resumes inside the stage it was in; finished stages are reloaded from their final checkpoint).
With stages.method_after_first = "mmr", stages after the first re-rank the remaining attention layers by
MMR on the current hybrid before converting (the Apriel-H1 procedure after its first 25 layers).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .config import DistillConfig
from .modeling import convert, layers_of, layout_of, transfer_matching
from .pipeline import Setup, layout_for
from .ranking import make_ranking, mmr_scores, save_ranking
from .trainer import Trainer, evaluate, latest_checkpoint

__all__ = ["next_layout", "run_stages"]


def next_layout(current: list[str], order: list[int], num_mixers: int) -> list[str]:
    """`current` plus attention layers taken from `order` (skipping ones already converted) until it holds
    num_mixers mixers."""
    layout = list(current)
    have = layout.count("m2")
    if num_mixers < have:
        raise ValueError(f"stages.schedule: {num_mixers} mixers is fewer than the {have} already converted")
    for layer in order:
        if have == num_mixers:
            break
        if layout[layer] == "t":
            layout[layer] = "m2"
            have += 1
    if have != num_mixers:
        raise ValueError(f"stages.schedule: cannot reach {num_mixers} mixers with the ranking's {len(order)} layers")
    return layout


def run_stages(cfg: DistillConfig, setup: Setup, order: list[int], out_dir: Path) -> tuple[torch.nn.Module, list[dict]]:
    """Run every stage; returns the last stage's student and one summary per stage."""
    n_layers = len(layers_of(setup.teacher))
    if cfg.stages.schedule[-1] > n_layers:
        raise ValueError(f"stages.schedule: {cfg.stages.schedule[-1]} mixers exceed the teacher's {n_layers} layers")
    summaries, prev = [], None
    layout = ["t"] * n_layers
    info = setup.info
    for k, n_mix in enumerate(cfg.stages.schedule):
        stage_dir = out_dir / f"stage_{k}_{n_mix}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        stage_order = order
        if k > 0 and cfg.stages.method_after_first == "mmr":
            candidates = [i for i, code in enumerate(layout) if code == "t"]
            scores = mmr_scores(setup.teacher, prev, candidates, setup.fresh_stream(), steps=cfg.rank.mmr_steps,
                                lr=cfg.rank.mmr_lr, last=cfg.rank.mmr_last, loss_cfg=cfg.loss, device=info.device,
                                mil_mapping=cfg.model.mil_mapping, seed=cfg.train.seed,
                                progress=cfg.train.progress and info.is_main)
            ranking = make_ranking("mmr", "distill_loss", scores, n_layers, cfg.model.teacher,
                                   {"base_layout": layout})
            if info.is_main:
                save_ranking(stage_dir / "ranking.json", ranking)
            stage_order = ranking["order"]
        layout = next_layout(layout if k else layout_for([], 0, n_layers), stage_order, n_mix)
        torch.manual_seed(cfg.train.seed + k)
        student = convert(setup.teacher, layout, mil_mapping=cfg.model.mil_mapping, seed=cfg.train.seed + k)
        if prev is not None:
            transfer_matching(prev, student)
        init_eval = evaluate(student.to(info.device), setup.teacher, setup.eval_batches, info.device,
                             cfg.loss.chunk_tokens)
        done = stage_dir / "done.json"
        trainer = Trainer(cfg, student, setup.teacher, setup.fresh_stream(), setup.eval_batches, stage_dir, info,
                          tag=f"stage{k}_{n_mix}")
        if done.is_file() and latest_checkpoint(stage_dir) is not None:
            trainer.load_checkpoint(latest_checkpoint(stage_dir))
            summary = json.loads(done.read_text())
        else:
            result = trainer.run()
            summary = {"stage": k, "mixers": n_mix, "layout": layout, "init_eval": init_eval,
                       **{key: v for key, v in result.items() if key != "history"}}
            if info.is_main:
                done.write_text(json.dumps(summary, indent=1, default=float))
        if info.is_main:
            e = summary.get("eval") or {}
            print(f"distill: stage {k} ({n_mix} mixers): reverse KL {init_eval['rev_kl']:.4f} (MIL init) -> "
                  f"{e.get('rev_kl', float('nan')):.4f} after {summary['step']} steps", file=sys.stderr)
        summaries.append(summary)
        prev = student
        assert layout_of(student) == layout
    return prev, summaries
