"""What the distill loop needs from a model, for the hybrid (apriel_model) and any HF causal LM alike:
load the teacher, build the student by conversion, final hidden states of a packed batch, the lm_head
weight, the mixer parameters, a layer temporarily replaced by identity, greedy generation, and a weight
transfer between two layouts of one teacher.
"""
from __future__ import annotations

import contextlib
import copy
import time

import torch
from torch import nn

from .data import Batch

__all__ = [
    "convert",
    "final_hidden",
    "greedy_generate",
    "identity_layer",
    "is_hybrid",
    "layers_of",
    "layout_of",
    "lm_head_weight",
    "load_teacher",
    "mixer_parameters",
    "set_trainable",
    "transfer_matching",
    "weight_decay_groups",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_teacher(spec: str, dtype: str = "float32"):
    """'embedded' -> apriel_model.embedded.load_embedded_teacher; otherwise an HF directory. Returns
    (model in eval mode with frozen parameters, tokenizer)."""
    torch_dtype = DTYPES[dtype]
    if spec == "embedded":
        from apriel_model.embedded import load_embedded_teacher

        model, tokenizer = load_embedded_teacher(torch_dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec)
        try:
            import apriel_model  # noqa: F401 - registers the hybrid classes with the Auto factories
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def is_hybrid(model) -> bool:
    return hasattr(getattr(model, "config", None), "hybrid_block_layout")


def layers_of(model) -> nn.ModuleList:
    return model.model.layers


def layout_of(model) -> list[str]:
    """Per-layer mixer codes; an HF transformer is all attention ("t")."""
    if is_hybrid(model):
        return [layer.mixer_type for layer in layers_of(model)]
    return ["t"] * len(layers_of(model))


def _block_causal_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, L) document ids -> (b, 1, L, L) bool: causal and within one document."""
    L = seq_idx.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seq_idx.device).tril()
    same = seq_idx[:, :, None] == seq_idx[:, None, :]
    return (causal & same)[:, None]


def final_hidden(model, batch: Batch) -> torch.Tensor:
    """Final-norm hidden states (b, L, H) of a (packed) batch, documents kept apart in every mixer."""
    if is_hybrid(model):
        # One document per row (and no padding): let attention take its causal fast path.
        seq_idx = batch.seq_idx if bool(batch.seq_idx.any()) else None
        return model.model(input_ids=batch.input_ids, position_ids=batch.position_ids, seq_idx=seq_idx)
    out = model.model(input_ids=batch.input_ids, attention_mask=_block_causal_mask(batch.seq_idx),
                      position_ids=batch.position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def lm_head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


def mixer_parameters(model) -> list[nn.Parameter]:
    """Parameters of the Mamba mixers (layers whose mixer_type is "m2")."""
    params = []
    for layer in layers_of(model):
        if getattr(layer, "mixer_type", "t") == "m2":
            params += list(layer.mixer.parameters())
    return params


def set_trainable(model, trainable: str) -> list[nn.Parameter]:
    """Freeze everything but the mixers ("mixers") or nothing ("all"); returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(trainable == "all")
    if trainable == "mixers":
        for p in mixer_parameters(model):
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"train.trainable={trainable!r}: the student has no trainable parameter (no mixer layer?)")
    return params


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the trainable parameters of `module`: weight decay on the matrices (linear and
    embedding weights, conv kernels), none on the mixers' A_log and D, on biases or on norm weights - the convention
    of mamba-ssm (`_no_weight_decay` on A_log / D) and of the transformers Trainer (biases, norms): decaying A_log pulls
    every state's decay rate toward A = -1, and decaying a norm weight toward 0 rescales its layer's output.
    Every trainable parameter lands in exactly one group, in module order; empty groups are dropped."""
    decay, keep = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or name.rsplit(".", 1)[-1] in ("A_log", "D") or getattr(p, "_no_weight_decay", False)
        (keep if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class _Identity(nn.Module):
    """Stands in for a decoder layer: returns its hidden-state input (first argument) unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def identity_layer(model, index: int):
    """Within the block, layer `index` of the model is the identity (LOO)."""
    layers = layers_of(model)
    original = layers[index]
    layers[index] = _Identity()
    try:
        yield model
    finally:
        layers[index] = original


def convert(teacher, layout: list[str], mil_mapping: str = "peers", seed: int = 0):
    """The hybrid of `layout` (codes "t"/"m2"/"i"), MIL-initialised from the teacher (apriel_model.convert)."""
    from apriel_model.convert import convert_to_hybrid

    hybrid = convert_to_hybrid(teacher, layout=list(layout), mil_mapping=mil_mapping, seed=seed)
    return hybrid


def transfer_matching(src: nn.Module, dst: nn.Module) -> list[str]:
    """Copy every tensor of src's state dict into dst where the name and shape match (a previous stage's
    trained mixers and shared weights); returns the names of dst left at their own (MIL) initialisation."""
    src_state = src.state_dict()
    dst_state = dst.state_dict()
    kept = []
    with torch.no_grad():
        for name, tensor in dst_state.items():
            other = src_state.get(name)
            if other is not None and other.shape == tensor.shape:
                tensor.copy_(other.to(tensor.dtype))
            else:
                kept.append(name)
    return kept


@torch.no_grad()
def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int, device="cpu") -> tuple[str, float]:
    """Greedy answer to one user prompt, recomputing the full forward per token (no cache: works for any
    model and any layout). Returns (text, tokens/s)."""
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"<user>\n{prompt}\n<assistant>\n"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
    eos = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>",)
                                      if t in tokenizer.get_vocab()}
    new = []
    start = time.perf_counter()
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[:, -1]
        token = int(logits.argmax(-1))
        if token in eos:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    elapsed = time.perf_counter() - start
    return tokenizer.decode(new, skip_special_tokens=True), len(new) / max(elapsed, 1e-9)


def clone_model(model):
    return copy.deepcopy(model)
