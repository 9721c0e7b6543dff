"""HF-format checkpoints of hybrids: safetensors only (never pickle), in our format or the published ones.

    save_hybrid(model, path, format="apriel_hybrid", max_shard_size="5GB", tokenizer=None)
    load_hybrid(path, dtype=None, device=None) -> AprielHybridForCausalLM (or its apriel_h / Fast-LLM twin)
    export_config_dict(config, format) -> the config.json dict of a format

Formats (mixer.md section 6): "apriel_hybrid" (ours: every field), "apriel_h" (the published Apriel-H1
release, config class derived from MistralConfig) and "apriel_hybrid_ssm" (Fast-LLM's export). All three
share the weight names (model.layers.i.mixer.{in_proj, dt_in_proj, dt_proj, conv1d, A_log, D, out_proj},
self_attn.{q,k,v,o}_proj, ...) and the double dt bias, so only config.json differs; "i" layers have no
weights. A published directory loads with `load_hybrid` or `AutoModelForCausalLM.from_pretrained` (the
model types are registered on import; no remote code runs). An exported directory is what ServiceNow's
tools read: add their modeling files and an auto_map if a tool insists on remote code.
"""
from __future__ import annotations

import json
import os

import torch

from . import configuration as C
from .modeling import AprielHybridForCausalLM

__all__ = ["FORMATS", "export_config_dict", "load_hybrid", "save_hybrid"]

FORMATS = {
    "apriel_hybrid": "AprielHybridForCausalLM",
    "apriel_h": "AprielHForCausalLM",
    "apriel_hybrid_ssm": "AprielHybridSSMForCausalLM",
}
_OURS_ONLY = ("rope_settings", "attention_out_bias", "ssm_state_dtype")


def export_config_dict(config: C.AprielHybridConfig, format: str) -> dict:
    """config.json content for `format`. The published formats get explicit ssm_cfg sizes (no None, no
    "auto"), rope_scaling under its Mistral name, and none of our extra fields."""
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    d = config.to_dict()
    d["model_type"] = format
    d["architectures"] = [FORMATS[format]]
    if format == "apriel_hybrid":
        return d
    if config.attention_out_bias != config.attention_bias:
        raise ValueError("format: the published formats have one attention_bias flag; this model has q/k/v "
                         "biases without an o_proj bias (Qwen2 style): save it as 'apriel_hybrid'")
    d_inner, d_xb, d_state, dt_rank, d_conv = config.mixer_dims()
    d["ssm_cfg"] = {**config.ssm_cfg, "d_inner": d_inner, "d_xb": d_xb, "d_state": d_state, "dt_rank": dt_rank,
                    "d_conv": d_conv}
    d["rope_scaling"] = config.rope_settings
    for key in _OURS_ONLY:
        d.pop(key, None)
    return d


def save_hybrid(model: AprielHybridForCausalLM, path: str | os.PathLike, format: str = "apriel_hybrid",
                max_shard_size: int | str = "5GB", tokenizer=None) -> None:
    """Write config.json + model.safetensors (sharded with an index above max_shard_size)."""
    if not isinstance(model, AprielHybridForCausalLM):
        raise TypeError(f"model: expected an AprielHybridForCausalLM, got {type(model).__name__}")
    config_dict = export_config_dict(model.config, format)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True, default=str)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    if pickles:
        raise RuntimeError(f"save_hybrid: pickle files were written ({pickles}); only safetensors are allowed")


def load_hybrid(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Open a hybrid directory of any of FORMATS (safetensors only)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"path: expected an HF directory with config.json, got {path}")
    with open(cfg_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in FORMATS:
        raise ValueError(f"path: expected a config with model_type in {list(FORMATS)}, got {model_type!r} "
                         "(a plain Llama/Mistral/Qwen2 teacher goes through convert.convert_to_hybrid)")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", use_safetensors=True)
    if device is not None:
        model = model.to(device)
    return model.eval()
