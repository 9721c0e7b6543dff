"""Named model shapes, so benchmarks and tests can build random-weight models of real shapes.

    get_preset(name, layout=None, **overrides) -> AprielHybridConfig
    PRESETS: name -> config kwargs;  preset_layout(name, layout) -> list of codes

layout: None (the preset's default), a named layout of the preset ("all-attention", "H1-25", ...,
"50%"), or an explicit list of codes.

The apriel-15b shape is the Apriel-Nemotron-15B teacher of mixer.md section 1 (50 layers, H 5120, 32/8
heads of 128, vocab 131072) with the H1 mixer (d_inner 4096, d_xb 1024, d_state 16, dt_rank 16).
The H1-25/30/40 layouts here are INVENTED (ServiceNow's exact per-layer placement is not reproduced in
this repository): the first k layers of convert.spread_ranking(50), i.e. mixers spread evenly over the
depth. They have the published mixer counts, which is what decode speed depends on.
"""
from __future__ import annotations

from .configuration import AprielHybridConfig
from .convert import spread_ranking

__all__ = ["PRESETS", "get_preset", "preset_layout"]

_H1_SSM = {"d_state": 16, "d_inner": 4096, "d_xb": 1024, "dt_rank": 16, "d_conv": 4}

PRESETS: dict[str, dict] = {
    "apriel-15b": dict(
        vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=50,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=65536,
        rope_theta=1e6, rms_norm_eps=1e-5, ssm_cfg=_H1_SSM, tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
        rms_norm_eps=1e-5, ssm_cfg={"d_state": 16, "dt_rank": 16}, tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=10000.0,
        ssm_cfg={"d_state": 8, "dt_rank": 4}, tie_word_embeddings=False,
    ),
}

_NAMED_MIXERS = {"apriel-15b": {"H1-25": 25, "H1-27": 27, "H1-30": 30, "H1-34": 34, "H1-37": 37, "H1-40": 40}}


def preset_layout(name: str, layout=None, num_layers: int | None = None) -> list[str]:
    """Codes of a named layout; with num_layers != the preset's, a named layout keeps its mixer fraction."""
    full = PRESETS[name]["num_hidden_layers"]
    n = num_layers or full
    if layout is None or layout == "all-attention":
        return ["t"] * n
    if isinstance(layout, (list, tuple)):
        return list(layout)
    if isinstance(layout, str) and layout.endswith("%"):
        k = round(n * float(layout[:-1]) / 100)
    elif isinstance(layout, str) and layout in _NAMED_MIXERS.get(name, {}):
        k = round(_NAMED_MIXERS[name][layout] * n / full)
    else:
        names = ["all-attention", "<p>%"] + list(_NAMED_MIXERS.get(name, {}))
        raise ValueError(f"layout: expected a list of codes or one of {names} for preset {name!r}, got {layout!r}")
    codes = ["t"] * n
    for i in spread_ranking(n)[:k]:
        codes[i] = "m2"
    return codes


def get_preset(name: str, layout=None, **overrides) -> AprielHybridConfig:
    """An AprielHybridConfig of a named shape; overrides replace config fields (a smaller
    num_hidden_layers keeps a named layout's fraction of mixers, spread over the new depth)."""
    if name not in PRESETS:
        raise ValueError(f"name: expected one of {sorted(PRESETS)}, got {name!r}")
    kwargs = {**PRESETS[name], **overrides}
    codes = preset_layout(name, layout, kwargs["num_hidden_layers"])
    if len(codes) != kwargs["num_hidden_layers"]:
        raise ValueError(f"layout: expected {kwargs['num_hidden_layers']} codes, got {len(codes)}")
    return AprielHybridConfig(**kwargs, hybrid_block_layout=codes)
