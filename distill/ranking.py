"""Layer importance for choosing which attention layers become mixers (mixer.md 7).

    scores = loo_scores(teacher, batches, device, score="kl")        # {layer: importance}
    scores = mmr_scores(teacher, base, candidates, stream, cfg, device)  # {layer: distillation loss}
    ranking = make_ranking("loo", "kl", scores, ...); save_ranking(path, ranking); load_ranking(path)

LOO (leave one out): layer l is replaced by the identity and a held-out score is measured against the full
teacher: "kl" = mean reverse KL(ablated || teacher) over the scored trace tokens, "nll" = increase of the
traces' NLL. Lower importance = replaced first.
MMR (MIL-mixer reconstruction): for each candidate attention layer, a copy of the current model (the
teacher or the hybrid of the previous stage) gets a MIL-initialised mixer at that layer only, which is
distilled for `mmr_steps` steps (mixers only, same batches for every candidate); the recorded score is the
mean loss of the last `mmr_last` steps. Lower loss = easier to replace = replaced first.
Ranking JSON: {"method", "score", "scores": {layer: value}, "order": [layers, replace-first first],
"num_layers", "teacher", "created"}; `order` is all a later stage needs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .config import LossConfig
from .data import Batch, BatchStream
from .modeling import convert, identity_layer, layout_of, lm_head_weight, set_trainable, transfer_matching
from .trainer import StudentLoss, teacher_hidden

__all__ = ["load_ranking", "loo_scores", "make_ranking", "mmr_scores", "save_ranking"]


@torch.no_grad()
def loo_scores(teacher, batches: list[Batch], device, score: str = "kl", candidates: list[int] | None = None,
               chunk_tokens: int = 1024, progress: bool = False) -> dict[int, float]:
    """{layer: importance}: the held-out score's increase when that layer is the identity."""
    if score not in ("kl", "nll"):
        raise ValueError(f"score: expected 'kl' or 'nll', got {score!r}")
    teacher = teacher.to(device).eval()
    n_layers = len(teacher.model.layers)
    candidates = list(range(n_layers)) if candidates is None else list(candidates)
    bad = [c for c in candidates if not 0 <= c < n_layers]
    if bad:
        raise ValueError(f"candidates: layers {bad} out of range 0..{n_layers - 1}")
    batches = [b.to(device) for b in batches]
    cached = [teacher_hidden(teacher, b) for b in batches]  # the full teacher is the reference throughout
    w = lm_head_weight(teacher)
    wrapper = StudentLoss(teacher, LossConfig(chunk_tokens=chunk_tokens))

    def measure() -> float:
        sums = np.zeros(3)
        for b, h_t in zip(batches, cached):
            _, stats = wrapper(b, h_t, w)
            sums += [stats["rev_kl"], stats["nll"], stats["tokens"]]
        return (sums[0] if score == "kl" else sums[1]) / max(sums[2], 1)

    base = measure()
    scores = {}
    it = candidates
    if progress:
        from tqdm import tqdm

        it = tqdm(candidates, desc=f"LOO ({score})", dynamic_ncols=True)
    for layer in it:
        with identity_layer(teacher, layer):
            scores[layer] = measure() - base
    return scores


def mmr_scores(teacher, base_model, candidates: list[int], stream: BatchStream, *, steps: int, lr: float,
               last: int, loss_cfg: LossConfig, device, mil_mapping: str = "peers", seed: int = 0,
               progress: bool = False) -> dict[int, float]:
    """{layer: mean distillation loss of the last `last` of `steps` steps} with a mixer at that layer only
    (on top of base_model's layout, whose trained mixers are kept and also train)."""
    base_layout = layout_of(base_model)
    teacher = teacher.to(device).eval()
    start_state = stream.state_dict()
    scores = {}
    it = candidates
    if progress:
        from tqdm import tqdm

        it = tqdm(candidates, desc="MMR", dynamic_ncols=True)
    w_t = lm_head_weight(teacher)
    for layer in it:
        if base_layout[layer] != "t":
            raise ValueError(f"candidates: layer {layer} is {base_layout[layer]!r}, expected an attention layer")
        layout = list(base_layout)
        layout[layer] = "m2"
        torch.manual_seed(seed)
        student = convert(teacher, layout, mil_mapping=mil_mapping, seed=seed)
        transfer_matching(base_model, student)
        student.to(device).train()
        params = set_trainable(student, "mixers")
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
        wrapper = StudentLoss(student, loss_cfg)
        stream.load_state_dict(start_state)  # every candidate sees the same batches
        losses = []
        for _ in range(steps):
            batch = stream.next().to(device)
            loss, _ = wrapper(batch, teacher_hidden(teacher, batch), w_t)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        scores[layer] = float(np.mean(losses[-max(1, last):]))
        del student, opt, wrapper
    stream.load_state_dict(start_state)
    return scores


def make_ranking(method: str, score: str, scores: dict[int, float], num_layers: int, teacher: str,
                 extra: dict | None = None) -> dict:
    order = sorted(scores, key=lambda layer: (scores[layer], layer))
    return {"method": method, "score": score, "scores": {str(k): float(v) for k, v in sorted(scores.items())},
            "order": order, "num_layers": num_layers, "teacher": teacher,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}


def save_ranking(path: str | Path, ranking: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(ranking, indent=1))
    tmp.replace(path)
    return path


def load_ranking(path: str | Path, num_layers: int | None = None) -> dict:
    """Read and check a ranking JSON; `order` must be distinct layers in range."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ranking: {path} does not exist")
    ranking = json.loads(path.read_text())
    order = ranking.get("order")
    n = num_layers if num_layers is not None else ranking.get("num_layers")
    if not isinstance(order, list) or len(set(order)) != len(order) or not all(isinstance(x, int) for x in order):
        raise ValueError(f"ranking {path}: 'order' must be a list of distinct layer indices")
    if n is not None and any(not 0 <= x < n for x in order):
        raise ValueError(f"ranking {path}: 'order' has layers outside 0..{n - 1}")
    return ranking
