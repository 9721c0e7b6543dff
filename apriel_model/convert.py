"""Teacher -> hybrid conversion with the Mamba-in-Llama (MIL) initialisation (mixer.md section 5).

    hybrid_from_teacher_config(teacher_config, ssm_cfg=None) -> AprielHybridConfig   (layout all "t")
    convert_to_hybrid(teacher, layout=None, num_mixers=None, ranking=None, mil_mapping="peers", seed=0,
                      ssm_cfg=None) -> AprielHybridForCausalLM
    load_teacher(path_or_model, dtype=None) -> a transformers causal LM (HF directory, sharded or not)

teacher: a Llama / Mistral / Qwen2 transformers model (e.g. loaded from GGUF), an HF directory of one, or
an AprielHybridForCausalLM (stage n -> n+k: its "m2" layers are kept as they are). Every weight that is not
a new mixer is copied bit for bit; a new mixer gets C <- q_proj, B <- k_proj, x <- v_proj, out_proj <-
o_proj, and the Mamba defaults elsewhere (z rows and dt_in_proj: nn.Linear's default init). Attention
biases (Qwen2) have no place in the mixer and are dropped for converted layers.

mil_mapping: "peers" copies q rows / o columns in their natural order (what MambaInLlama, M1 and
Apriel-H1 do: only 1 in 8 mixer heads sees the query chunk that matches its key chunk). "aligned" orders
them so the r heads sharing B/x group g = (kv head k, chunk j) are the r query heads of kv head k at chunk
j: the mixer is equivariant to a head permutation, so this is only a different starting point.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from .configuration import AprielHybridConfig
from .modeling import AprielHybridForCausalLM

__all__ = ["convert_to_hybrid", "hybrid_from_teacher_config", "load_teacher", "mil_head_order", "spread_ranking"]

MIL_MAPPINGS = ("peers", "aligned")


def _rope_of(cfg) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from a transformers 4 or 5 config."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = params.pop("rope_theta", None) or getattr(cfg, "rope_theta", None) or 10000.0
    scaling = getattr(cfg, "rope_settings", None)
    if scaling is None:
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = params if rope_type != "default" else None
    return float(theta), (dict(scaling) if scaling else None)


def hybrid_from_teacher_config(teacher_config, ssm_cfg: dict | None = None) -> AprielHybridConfig:
    """The all-attention AprielHybridConfig with the teacher's (Llama / Mistral / Qwen2) shapes."""
    if isinstance(teacher_config, AprielHybridConfig):
        cfg = AprielHybridConfig(**teacher_config.to_dict())
        if ssm_cfg:
            cfg.ssm_cfg.update(ssm_cfg)
        return cfg
    mt = getattr(teacher_config, "model_type", "")
    if mt not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"teacher: expected a llama, mistral or qwen2 config, got model_type {mt!r}")
    tc = teacher_config
    theta, scaling = _rope_of(tc)
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    if mt == "qwen2":  # q/k/v carry biases, o_proj does not
        qkv_bias, o_bias = True, False
        window = tc.sliding_window if getattr(tc, "use_sliding_window", False) else None
    else:
        qkv_bias = o_bias = bool(getattr(tc, "attention_bias", False))
        window = getattr(tc, "sliding_window", None) if mt == "mistral" else None
    return AprielHybridConfig(
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_act=tc.hidden_act,
        max_position_embeddings=tc.max_position_embeddings,
        initializer_range=getattr(tc, "initializer_range", 0.02),
        rms_norm_eps=tc.rms_norm_eps,
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=qkv_bias,
        attention_out_bias=o_bias,
        mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        sliding_window=window,
        ssm_cfg=ssm_cfg,
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
        pad_token_id=getattr(tc, "pad_token_id", None),
        bos_token_id=getattr(tc, "bos_token_id", None),
        eos_token_id=getattr(tc, "eos_token_id", None),
    )


def load_teacher(teacher, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers causal LM from an HF directory (safetensors, sharded or not), or the model itself."""
    if isinstance(teacher, nn.Module):
        return teacher
    if not isinstance(teacher, (str, os.PathLike)) or not os.path.isdir(teacher):
        raise ValueError(f"teacher: expected a transformers model or an HF checkpoint directory, got {teacher!r}")
    from transformers import AutoModelForCausalLM

    from . import checkpoint  # noqa: F401  (registers our model types, so hybrid directories open too)

    return AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype or "auto", use_safetensors=True)


def spread_ranking(num_layers: int) -> list[int]:
    """A deterministic replacement order with no importance data: inner layers in bit-reversed (van der
    Corput) order of their index, so every prefix of k layers is spread over the depth; the first and last
    layers come last."""
    inner = list(range(1, num_layers - 1)) if num_layers > 2 else list(range(num_layers))
    bits = max(1, (len(inner) - 1).bit_length())

    def reversed_bits(idx: int) -> int:
        return int(format(idx, f"0{bits}b")[::-1], 2)

    order = [inner[k] for k in sorted(range(len(inner)), key=reversed_bits)]
    return order + [i for i in (0, num_layers - 1) if i not in order]


def _target_layout(base: list[str], layout, num_mixers, ranking) -> list[str]:
    n = len(base)
    if layout is not None and num_mixers is not None:
        raise ValueError("layout, num_mixers: expected one of them, got both")
    if layout is not None:
        layout = list(layout)
        if len(layout) != n:
            raise ValueError(f"layout: expected {n} codes (the teacher's layers), got {len(layout)}")
    elif num_mixers is not None:
        current = base.count("m2")
        if not current <= num_mixers <= n - base.count("i"):
            raise ValueError(f"num_mixers: expected {current}..{n - base.count('i')} (mixers already there ..."
                             f" non-identity layers), got {num_mixers}")
        ranking = list(ranking) if ranking is not None else spread_ranking(n)
        if sorted(set(ranking)) != sorted(ranking) or any(not 0 <= i < n for i in ranking):
            raise ValueError(f"ranking: expected distinct layer indices in [0, {n}), got {ranking}")
        layout, todo = list(base), num_mixers - current
        for i in ranking:
            if todo == 0:
                break
            if layout[i] == "t":
                layout[i], todo = "m2", todo - 1
        if todo:
            raise ValueError(f"ranking: names too few attention layers to reach {num_mixers} mixers")
    else:
        layout = list(base)
    for i, (old, new) in enumerate(zip(base, layout)):
        if new not in ("t", "m2", "i"):
            raise ValueError(f"layout: expected codes t/m2/i, got {new!r} at layer {i}")
        if old != new and not (old == "t" or new == "i"):
            raise ValueError(f"layout: layer {i} is {old!r} in the teacher and cannot become {new!r}")
    return layout


def mil_head_order(num_heads: int, num_kv_heads: int, head_dim: int, d_state: int, mapping: str) -> torch.Tensor:
    """Row order (length num_heads * head_dim) of q_proj copied into C, and of o_proj columns into out_proj.

    Mixer head h (d_state channels) reads B/x group g = h // r, r = num_heads / num_kv_heads. "peers": the
    identity. "aligned": group g is (kv head k, chunk j) = (g // (head_dim / N), g % (head_dim / N)); its r
    mixer heads get chunk j of the r query heads k*r .. k*r + r-1 that attend with kv head k.
    """
    if mapping not in MIL_MAPPINGS:
        raise ValueError(f"mil_mapping: expected one of {list(MIL_MAPPINGS)}, got {mapping!r}")
    d_inner = num_heads * head_dim
    if mapping == "peers":
        return torch.arange(d_inner)
    if head_dim % d_state:
        raise ValueError(f"mil_mapping 'aligned': expected head_dim ({head_dim}) a multiple of d_state ({d_state})")
    r, chunks = num_heads // num_kv_heads, head_dim // d_state
    h = torch.arange(d_inner // d_state)
    g, i = h // r, h % r
    k, j = g // chunks, g % chunks
    q = k * r + i
    start = q * head_dim + j * d_state  # (heads,)
    return (start[:, None] + torch.arange(d_state)).reshape(-1)


@torch.no_grad()
def _mil_init(mixer, attn_sd: dict, config: AprielHybridConfig, mapping: str, generator: torch.Generator) -> None:
    d_inner, d_xb, d_state, _, _ = config.mixer_dims()
    q, k, v, o = (attn_sd[f"{n}_proj.weight"] for n in "qkvo")
    if q.shape[0] != d_inner or k.shape[0] != d_xb:
        raise ValueError(f"ssm_cfg: MIL needs d_inner = heads * head_dim ({q.shape[0]}) and d_xb = kv_heads * "
                         f"head_dim ({k.shape[0]}), got {d_inner}, {d_xb}")
    order = mil_head_order(config.num_attention_heads, config.num_key_value_heads, config.head_dim, d_state, mapping)
    dev, dtype = mixer.in_proj.weight.device, mixer.in_proj.weight.dtype
    hidden = q.shape[1]
    bound = 1.0 / math.sqrt(hidden)  # nn.Linear's default (kaiming_uniform a=sqrt(5)) for z rows and dt_in_proj
    z = (torch.rand(d_inner, hidden, generator=generator) * 2 - 1) * bound
    # z comes from the CPU generator (the same init on any device); the teacher may live on the GPU.
    w = torch.cat([z.to(device=q.device, dtype=q.dtype), v, k, q[order.to(q.device)]], dim=0)  # z, x, B, C
    mixer.in_proj.weight.copy_(w.to(device=dev, dtype=dtype))
    dt_in = (torch.rand(mixer.dt_in_proj.weight.shape, generator=generator) * 2 - 1) * bound
    mixer.dt_in_proj.weight.copy_(dt_in.to(device=dev, dtype=dtype))
    mixer.out_proj.weight.copy_(o[:, order.to(o.device)].to(device=dev, dtype=dtype))
    for lin in (mixer.in_proj, mixer.dt_in_proj, mixer.out_proj):
        if lin.bias is not None:
            lin.bias.zero_()
    mixer.init_mixer_params(generator=generator)


@torch.no_grad()
def convert_to_hybrid(
    teacher,
    layout: list[str] | None = None,
    num_mixers: int | None = None,
    ranking: list[int] | None = None,
    mil_mapping: str = "peers",
    seed: int = 0,
    ssm_cfg: dict | None = None,
    dtype: torch.dtype | None = None,
) -> AprielHybridForCausalLM:
    """Build the hybrid (see the module docstring). layout: target codes per layer, or num_mixers with a
    ranking (layer indices, most replaceable first; default spread_ranking). Returns a model on the
    teacher's device and dtype (or `dtype`), in eval mode."""
    if mil_mapping not in MIL_MAPPINGS:
        raise ValueError(f"mil_mapping: expected one of {list(MIL_MAPPINGS)}, got {mil_mapping!r}")
    teacher = load_teacher(teacher, dtype)
    is_hybrid = isinstance(teacher, AprielHybridForCausalLM)
    base_cfg = hybrid_from_teacher_config(teacher.config, ssm_cfg)
    base = list(base_cfg.hybrid_block_layout)
    target = _target_layout(base, layout, num_mixers, ranking)
    cfg = AprielHybridConfig(**{**base_cfg.to_dict(), "hybrid_block_layout": target})
    cfg.architectures = ["AprielHybridForCausalLM"]
    sd = teacher.state_dict()
    ref = next(iter(sd.values()))
    dtype = dtype or ref.dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 15B model never exists in fp32
    try:
        with torch.device(ref.device):
            model = AprielHybridForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    generator = torch.Generator().manual_seed(seed)
    own = model.state_dict()
    new_sd = {}
    for name in own:
        if name.startswith("model.layers.") and name.split(".")[3] == "mixer":
            i = int(name.split(".")[2])
            if base[i] == "t":
                continue  # a new mixer: MIL below
        if name not in sd:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise KeyError(f"teacher: has no weight {name!r} (teacher type {type(teacher).__name__})")
        new_sd[name] = sd[name]
    missing = [n for n in model.load_state_dict(new_sd, strict=False).missing_keys
               if not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    for i, code in enumerate(target):
        if code == "m2" and base[i] == "t":
            prefix = f"model.layers.{i}.self_attn."
            attn_sd = {n[len(prefix):]: t for n, t in sd.items() if n.startswith(prefix)}
            _mil_init(model.model.layers[i].mixer, attn_sd, cfg, mil_mapping, generator)
            missing = [n for n in missing if not n.startswith(f"model.layers.{i}.mixer.")]
    if missing:
        raise KeyError(f"teacher: weights left unset after conversion: {missing[:5]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    if is_hybrid:
        model.generation_config = teacher.generation_config
    return model.eval()
