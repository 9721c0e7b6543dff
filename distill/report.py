"""Human-readable reports: the demo's comparison table (teacher vs MIL-initialised vs distilled hybrid),
the side-by-side answer, and a Markdown + JSON copy in the run directory.

    text = write_report(out_dir, report)   # report: {"rows": [...], "answers": {...}, "meta": {...}}
    each row: {"model", "rev_kl", "top1", "nll", "tok_s"}; answers: {"prompt", "teacher", "hybrid"}.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

__all__ = ["format_table", "write_report"]


def format_table(rows: list[dict]) -> str:
    head = f"| {'model':<28} | {'held-out reverse KL':>19} | {'top-1 agreement':>15} | {'NLL':>7} | {'fwd tok/s':>9} |"
    sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append(f"| {r['model']:<28} | {r['rev_kl']:>19.4f} | {100 * r['top1']:>14.1f}% | {r['nll']:>7.3f} | "
                     f"{r['tok_s']:>9.0f} |")
    return "\n".join(lines)


def _side_by_side(answers: dict, width: int = 56) -> str:
    left = textwrap.wrap(answers["teacher"] or "(empty)", width) or [""]
    right = textwrap.wrap(answers["hybrid"] or "(empty)", width) or [""]
    n = max(len(left), len(right))
    left += [""] * (n - len(left))
    right += [""] * (n - len(right))
    lines = [f"Prompt: {answers['prompt']}", "", f"{'teacher':<{width}} | hybrid", f"{'-' * width}-+-{'-' * width}"]
    lines += [f"{a:<{width}} | {b}" for a, b in zip(left, right)]
    return "\n".join(lines)


def write_report(out_dir: str | Path, report: dict) -> str:
    """Render the report, write report.md and report.json under out_dir, and return the text."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = report.get("meta", {})
    parts = ["# Distillation report", ""]
    parts += [f"- {k}: {v}" for k, v in meta.items()]
    parts += ["", format_table(report["rows"]), ""]
    if report.get("answers"):
        parts += ["```", _side_by_side(report["answers"]), "```"]
    text = "\n".join(parts)
    (out_dir / "report.md").write_text(text + "\n")
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return text
