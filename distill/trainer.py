"""The distillation loop: AdamW, linear warm-up + cosine, gradient accumulation, clipping, bf16 autocast on
CUDA, activation checkpointing, periodic held-out evaluation, tqdm, JSONL + TensorBoard logs, atomic
checkpoints with exact resume, and a hard stop on a non-finite loss.

    trainer = Trainer(cfg, student, teacher, train_stream, eval_batches, out_dir, info)
    summary = trainer.run()   # {"step", "eval": {...}, "tokens_per_s", ...}

Checkpoints: <out_dir>/checkpoints/step_NNNNNNN/{state.pt, meta.json}, written into a temporary
directory first and published with os.replace; <out_dir>/checkpoints/LATEST (also replaced atomically)
names the newest complete one. state.pt holds the model, optimiser and scheduler states, the data
position and every RNG state, so a resumed run repeats exactly the steps an uninterrupted one would take.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed as D
from .config import DistillConfig, config_to_dict
from .data import Batch, BatchStream
from .losses import distill_loss
from .modeling import final_hidden, layers_of, lm_head_weight, set_trainable, weight_decay_groups

__all__ = ["NonFiniteLossError", "StudentLoss", "Trainer", "evaluate", "latest_checkpoint", "lr_lambda"]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient norm; no checkpoint was written for that step."""


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimiser step `step` (0-based): linear warm-up, then cosine to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StudentLoss(nn.Module):
    """The student plus the chunked loss in one forward, so FSDP2 unshards the student's lm_head for it.
    forward(batch, h_teacher (n, H_t) of the scored tokens, w_teacher) -> (loss, stats)."""

    def __init__(self, student: nn.Module, loss_cfg):
        super().__init__()
        self.student = student
        self.loss_cfg = loss_cfg

    def forward(self, batch: Batch, h_teacher: torch.Tensor, w_teacher: torch.Tensor):
        mask = batch.target_mask
        h = final_hidden(self.student, batch)[mask]
        c = self.loss_cfg
        w = lm_head_weight(self.student)
        return distill_loss(h, w, h_teacher.to(h.dtype), w_teacher.to(w.dtype), batch.labels[mask], kind=c.kind,
                            temperature=c.temperature, ce_weight=c.ce_weight, chunk_tokens=c.chunk_tokens,
                            backend=c.backend)


def teacher_hidden(teacher, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return final_hidden(teacher, batch)[batch.target_mask]


@torch.no_grad()
def evaluate(student, teacher, batches: list[Batch], device, chunk_tokens: int = 1024,
             info: D.DistInfo | None = None, autocast: bool = False) -> dict[str, float]:
    """Held-out scores of the student against the teacher over the scored tokens of `batches`:
    rev_kl (mean KL(student || teacher) per token, nats), top1 (fraction of tokens where both argmaxes
    agree), nll (student NLL of the trace tokens), tokens, and student/teacher forward tokens/s.
    `student` may be a StudentLoss wrapper (the sharded training module) or a bare model."""
    from .config import LossConfig

    wrapper = student if isinstance(student, StudentLoss) else StudentLoss(student, LossConfig(chunk_tokens=chunk_tokens))
    was_training = wrapper.training
    wrapper.eval()
    sums = np.zeros(4)
    t_student = t_teacher = 0.0
    seen = 0
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else _null()
    with ctx:
        for batch in batches:
            batch = batch.to(device)
            start = time.perf_counter()
            h_t = teacher_hidden(teacher, batch)
            _sync(device)
            t_teacher += time.perf_counter() - start
            start = time.perf_counter()
            _, stats = wrapper(batch, h_t, lm_head_weight(teacher))
            _sync(device)
            t_student += time.perf_counter() - start
            sums += [stats["rev_kl"], stats["top1"], stats["nll"], stats["tokens"]]
            seen += int(batch.attention_mask.sum())
    if info is not None:
        sums = np.array(D.all_sum(list(sums), info))
    wrapper.train(was_training)
    n = max(sums[3], 1)
    return {"rev_kl": sums[0] / n, "top1": sums[1] / n, "nll": sums[2] / n, "tokens": int(sums[3]),
            "student_tok_s": seen / max(t_student, 1e-9), "teacher_tok_s": seen / max(t_teacher, 1e-9)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / "LATEST"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def _rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def enable_activation_checkpointing(model) -> None:
    """Each decoder layer recomputes its forward in the backward (non-reentrant: any argument types)."""
    from torch.utils.checkpoint import checkpoint

    for layer in layers_of(model):
        if getattr(layer, "_distill_ckpt", False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = forward
        layer._distill_ckpt = True


class Trainer:
    """See the module docstring. `student` trains in place; `teacher` is frozen."""

    def __init__(self, cfg: DistillConfig, student, teacher, train_stream: BatchStream, eval_batches: list[Batch],
                 out_dir: str | Path, info: D.DistInfo | None = None, tag: str = "train"):
        self.cfg, self.tag = cfg, tag
        self.info = info or D.DistInfo(device=torch.device("cpu"))
        self.device = self.info.device
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.stream, self.eval_batches = train_stream, eval_batches
        self.teacher = teacher.to(self.device)
        self.student = student.to(self.device)
        params = set_trainable(self.student, cfg.train.trainable)
        self.n_trainable = sum(p.numel() for p in params)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(self.student)
        self.autocast = cfg.train.bf16 and self.device.type == "cuda"
        self.wrapper = D.shard_student(StudentLoss(self.student, cfg.loss), self.info)
        D.shard_teacher(self.teacher, self.info)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(weight_decay_groups(self.wrapper, o.weight_decay), lr=o.lr,
                                           betas=tuple(o.betas))
        total = cfg.train.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, o.warmup_steps, total, o.min_lr_ratio))
        self.step = 0
        self.history: list[dict] = []
        self.tokens_trained = 0
        self._tb = None

    # ------------------------------------------------------------------------------------------ logging
    def _log(self, record: dict) -> None:
        if not self.info.is_main:
            return
        record = {"tag": self.tag, **record}
        with (self.out_dir / "log.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.cfg.train.tensorboard:
            if self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
                except Exception:  # noqa: BLE001 - TensorBoard is optional; JSONL is the record
                    self._tb = False
            if self._tb:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "step":
                        self._tb.add_scalar(f"{self.tag}/{key}", value, record.get("step", 0))
                self._tb.flush()

    # ---------------------------------------------------------------------------------------- checkpoint
    def save_checkpoint(self) -> Path:
        model_state, optim_state = D.full_state(self.wrapper, self.optimizer, self.info)
        path = self.ckpt_dir / f"step_{self.step:07d}"
        if self.info.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.ckpt_dir / f".tmp_step_{self.step:07d}_{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            state = {"model": model_state, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                     "data": self.stream.state_dict(), "rng": _rng_state(), "step": self.step,
                     "tokens_trained": self.tokens_trained, "history": self.history}
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": self.step, "config": config_to_dict(self.cfg)},
                                                      indent=1, default=str))
            _fsync_dir(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
            pointer_tmp = self.ckpt_dir / f".LATEST.{os.getpid()}"
            pointer_tmp.write_text(path.name)
            os.replace(pointer_tmp, self.ckpt_dir / "LATEST")
            _fsync_dir(self.ckpt_dir)
            old = sorted(p for p in self.ckpt_dir.glob("step_*") if p.name != path.name)
            for stale in old[: max(0, len(old) - (self.cfg.train.keep_checkpoints - 1))]:
                shutil.rmtree(stale, ignore_errors=True)
        D.barrier(self.info)
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        D.load_full_state(self.wrapper, self.optimizer, state["model"], state["optimizer"], self.info)
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        self.tokens_trained = state["tokens_trained"]
        self.history = state["history"]

    # -------------------------------------------------------------------------------------------- train
    def _micro_step(self, batch: Batch):
        batch = batch.to(self.device)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else _null()
        with ctx:
            h_t = teacher_hidden(self.teacher, batch)
            loss, stats = self.wrapper(batch, h_t, lm_head_weight(self.teacher))
        (loss / self.cfg.optim.grad_accum).backward()
        return float(loss.detach()), stats, int(batch.attention_mask.sum())

    def evaluate(self) -> dict:
        return evaluate(self.wrapper, self.teacher, self.eval_batches, self.device, self.cfg.loss.chunk_tokens,
                        self.info if self.info.enabled else None, self.autocast)

    def run(self) -> dict:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed_from = None
        if cfg.train.resume and (ckpt := latest_checkpoint(self.out_dir)) is not None:
            self.load_checkpoint(ckpt)
            resumed_from = str(ckpt)
            if self.info.is_main:
                print(f"distill: resumed {self.tag} from {ckpt} at step {self.step}", file=sys.stderr)
        self.wrapper.train()
        start_time = time.perf_counter()
        total = cfg.train.steps
        bar = None
        if cfg.train.progress and self.info.is_main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc=self.tag, dynamic_ncols=True, file=sys.stderr)
        last_eval = None
        step_tokens_time = [0, 0.0]
        while self.step < total:
            t0 = time.perf_counter()
            losses, sums, n_tok = [], {"rev_kl": 0.0, "top1": 0.0, "tokens": 0.0}, 0
            for _ in range(cfg.optim.grad_accum):
                loss, stats, tokens = self._micro_step(self.stream.next())
                losses.append(loss)
                n_tok += tokens
                for k in sums:
                    sums[k] += stats[k]
            loss = float(np.mean(losses))
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                [p for p in self.wrapper.parameters() if p.requires_grad],
                cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else float("inf")))
            loss, grad_norm = D.all_mean([loss, grad_norm], self.info)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                last = latest_checkpoint(self.out_dir)
                raise NonFiniteLossError(
                    f"{self.tag}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step "
                    f"{self.step + 1} (loss={loss}, grad_norm={grad_norm}); stopped without writing a checkpoint. "
                    f"Last good checkpoint: {last or 'none'} (untouched). Try a lower optim.lr, loss.temperature "
                    f"closer to 1, or check the data.")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            n_tok = int(D.all_sum([n_tok], self.info)[0])
            self.tokens_trained += n_tok
            dt = time.perf_counter() - t0
            step_tokens_time[0] += n_tok
            step_tokens_time[1] += dt
            record = {"step": self.step, "loss": loss, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                      "train_rev_kl": sums["rev_kl"] / max(sums["tokens"], 1),
                      "train_top1": sums["top1"] / max(sums["tokens"], 1), "tokens": n_tok, "tok_s": n_tok / dt}
            self.history.append({"step": self.step, "loss": loss})
            if cfg.train.log_every and self.step % cfg.train.log_every == 0:
                self._log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{n_tok / dt:.0f}")
            out_of_time = cfg.train.max_minutes > 0 and (time.perf_counter() - start_time) > 60 * cfg.train.max_minutes
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < total:
                last_eval = self.evaluate()
                self._log({"step": self.step, **{f"eval_{k}": v for k, v in last_eval.items()}})
            if (cfg.train.save_every and self.step % cfg.train.save_every == 0) or self.step == total or out_of_time:
                self.save_checkpoint()
            if out_of_time:
                if self.info.is_main:
                    print(f"distill: {self.tag} stopped at step {self.step}: train.max_minutes reached", file=sys.stderr)
                break
        if bar is not None:
            bar.close()
        final_eval = self.evaluate() if self.eval_batches else last_eval
        if final_eval is not None:
            self._log({"step": self.step, **{f"eval_{k}": v for k, v in final_eval.items()}})
        if self._tb:
            self._tb.close()
        return {"step": self.step, "eval": final_eval, "resumed_from": resumed_from,
                "train_tok_s": step_tokens_time[0] / max(step_tokens_time[1], 1e-9),
                "train_seconds": step_tokens_time[1], "tokens_trained": self.tokens_trained,
                "trainable_params": self.n_trainable, "history": self.history}


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry so a crash right after os.replace cannot lose the rename."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
