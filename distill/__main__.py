"""`python -m distill <command>` (console script: apriel-distill).

Commands:
  demo     the embedded default end to end: teacher, LOO ranking, convert, distill, report, HF save
  rank     rank layers (rank.method = loo | mmr) and write the ranking JSON
  train    convert model.num_mixers layers (by ranking) and distill once
  stages   staged conversion along stages.schedule
  traces   have the teacher answer a prompt file -> JSONL traces
  config   print the resolved configuration (and --fields: every field with its docstring)

Every command takes --preset NAME (embedded | apriel-15b), --config FILE.toml and overrides
`section.field=value` (e.g. `train.steps=100 loss.kind=forward_kl`). Multi-GPU / multi-process:
`torchrun --nproc_per_node N -m distill train ...` (the same command).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .config import DistillConfig, config_to_dict, field_docs, load_config

COMMANDS = ("demo", "rank", "train", "stages", "traces", "config")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--preset", default="embedded", help="named preset: embedded | apriel-15b")
    p.add_argument("--config", default=None, help="TOML file with [section] tables")
    p.add_argument("--prompts", default="builtin:prompts", help="traces: prompt file (.jsonl with 'prompt', or .txt)")
    p.add_argument("--output", default=None, help="traces: output JSONL (default <train.out_dir>/traces.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="traces: tokens generated per answer")
    p.add_argument("--batch", type=int, default=16, help="traces: prompts generated together")
    p.add_argument("--fields", action="store_true", help="config: list every field with its docstring")
    return p


def _out_dir(cfg: DistillConfig) -> Path:
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _save_hf(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    print(f"distill: saved the hybrid (HF format) to {path}", file=sys.stderr)


def cmd_config(cfg: DistillConfig, args) -> int:
    if args.fields:
        from dataclasses import fields

        for section in fields(DistillConfig):
            docs = field_docs(type(getattr(cfg, section.name)))
            for name, doc in docs.items():
                print(f"{section.name}.{name} = {getattr(getattr(cfg, section.name), name)!r}\n    {doc}")
        return 0
    print(json.dumps(config_to_dict(cfg), indent=1))
    return 0


def cmd_rank(cfg: DistillConfig, args) -> int:
    from .modeling import layers_of
    from .pipeline import prepare
    from .ranking import make_ranking, mmr_scores, save_ranking

    out = _out_dir(cfg)
    setup = prepare(cfg)
    if cfg.rank.method == "loo":
        from .pipeline import ranking_order

        cfg.model.ranking = ""
        _, ranking = ranking_order(cfg, setup, out)
    else:
        n = len(layers_of(setup.teacher))
        scores = mmr_scores(setup.teacher, setup.teacher, list(range(n)), setup.stream, steps=cfg.rank.mmr_steps,
                            lr=cfg.rank.mmr_lr, last=cfg.rank.mmr_last, loss_cfg=cfg.loss, device=setup.info.device,
                            mil_mapping=cfg.model.mil_mapping, seed=cfg.train.seed, progress=cfg.train.progress)
        ranking = make_ranking("mmr", "distill_loss", scores, n, cfg.model.teacher)
        if setup.info.is_main:
            save_ranking(cfg.rank.out or out / "ranking.json", ranking)
    if setup.info.is_main:
        print(json.dumps({"method": ranking["method"], "order": ranking["order"]}))
    return 0


def cmd_train(cfg: DistillConfig, args) -> int:
    from .pipeline import build_student, prepare, ranking_order
    from .trainer import Trainer, latest_checkpoint

    out = _out_dir(cfg)
    setup = prepare(cfg)
    order = None if cfg.model.student else ranking_order(cfg, setup, out)[0]
    student = build_student(cfg, setup, order)
    trainer = Trainer(cfg, student, setup.teacher, setup.stream, setup.eval_batches, out, setup.info)
    init_eval = trainer.evaluate() if latest_checkpoint(out) is None or not cfg.train.resume else None
    result = trainer.run()
    if setup.info.is_main:
        summary = {"init_eval": init_eval, **{k: v for k, v in result.items() if k != "history"}}
        print(json.dumps(summary, default=float))
        if not setup.info.enabled:
            _save_hf(student, setup.tokenizer, out / "final")
    return 0


def cmd_stages(cfg: DistillConfig, args) -> int:
    from .pipeline import prepare, ranking_order
    from .stages import run_stages

    out = _out_dir(cfg)
    setup = prepare(cfg)
    order, _ = ranking_order(cfg, setup, out)
    student, summaries = run_stages(cfg, setup, order, out)
    if setup.info.is_main:
        (out / "stages.json").write_text(json.dumps(summaries, indent=1, default=float))
        if not setup.info.enabled:
            _save_hf(student, setup.tokenizer, out / "final")
    return 0


def cmd_traces(cfg: DistillConfig, args) -> int:
    from .traces import generate_traces

    out = Path(args.output) if args.output else _out_dir(cfg) / "traces.jsonl"
    n = generate_traces(cfg, args.prompts, out, max_new_tokens=args.max_new_tokens, batch=args.batch)
    print(f"distill: wrote {n} traces to {out}", file=sys.stderr)
    return 0


def cmd_demo(cfg: DistillConfig, args) -> int:
    from .demo import run_demo

    return run_demo(cfg)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"distill: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rc = {"demo": cmd_demo, "rank": cmd_rank, "train": cmd_train, "stages": cmd_stages, "traces": cmd_traces,
          "config": cmd_config}[args.command](cfg, args)
    # Only after success (see distributed.close); a process group exists only if the command imported
    # torch.distributed - `config` stays torch-free.
    if "torch.distributed" in sys.modules:
        from . import distributed as D

        D.close()
    if args.command != "config":
        print(f"distill: {args.command} finished in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return rc


def cli(argv: list[str] | None = None) -> int:
    """The command-line entry (`python -m distill`, the `apriel-distill` script): main(), then, after a clean run
    under torchrun (WORLD_SIZE > 1), the process ends by os._exit once its streams are flushed.

    Why: every result is on disk by then (checkpoints and outputs are written atomically), but interpreter
    finalisation still has to tear down what torch.distributed left behind (gloo's C++ worker threads, the store
    client), and that aborts now and then with SIGABRT, "terminate called without an active exception"
    (pytorch/pytorch#179291) - a failed rank for torchrun after a run that succeeded. In-process callers of main()
    (the tests) are unaffected; a failing run exits normally so that torchrun sees the failure as it is.
    """
    rc = main(argv)
    if rc == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(cli())
