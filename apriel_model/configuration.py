"""AprielHybridConfig: a Llama/Mistral/Qwen2-style decoder whose per-layer token mixer is set by a layout.

Layout codes (mixer.md sections 1 and 6): "t" attention, "m2" the Apriel-H1 Mamba mixer, "i" identity
layer (the whole layer, MLP and norms included, passes its input through, as in ServiceNow's code).

The same class reads the published configs: model_type "apriel_h" (Apriel-H1 release) and
"apriel_hybrid_ssm" (Fast-LLM export) are registered as thin subclasses, so `AutoConfig` /
`AutoModelForCausalLM.from_pretrained(dir)` open those directories without remote code.
"""
from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

__all__ = ["LAYOUT_CODES", "SSM_DEFAULTS", "AprielHConfig", "AprielHybridConfig", "AprielHybridSSMConfig"]

LAYOUT_CODES = ("t", "m2", "i")

# The Mamba mixer's hyper-parameters, with the names and defaults of the published ssm_cfg. d_inner / d_xb
# None mean "from the attention shape" (num_heads * head_dim and num_kv_heads * head_dim: what MIL needs).
SSM_DEFAULTS: dict[str, Any] = {
    "d_state": 16,
    "d_inner": None,
    "d_xb": None,
    "d_conv": 4,
    "dt_rank": 16,
    "repeat_kv_before_conv": True,
    "conv_bias": True,
    "dt_proj_bias": True,
    "bias": False,
    "dt_min": 0.001,
    "dt_max": 0.1,
    "dt_init": "random",
    "dt_scale": 1.0,
    "dt_init_floor": 1e-4,
    "expand": 1,
    "activation": "silu",
}


class AprielHybridConfig(PretrainedConfig):
    """Hybrid decoder configuration.

    Fields beyond the usual decoder ones:
        hybrid_block_layout: list of num_hidden_layers codes in LAYOUT_CODES (default all "t").
        ssm_cfg: the mixer's hyper-parameters (SSM_DEFAULTS keys); resolved sizes via `mixer_dims()`.
        attention_bias: biases on q/k/v (Qwen2, and Llama with attention_bias); attention_out_bias: on o_proj.
        rope_scaling: None or {"rope_type": "linear"|"dynamic"|"llama3", "factor": .., ...} (Llama/Qwen2 keys);
            stored as `rope_settings` (transformers 5 reserves the name rope_scaling); rope_parameters accepted.
        sliding_window: None or a window (Mistral), applied to attention masks.
        ssm_state_dtype: "float32" (default) or "bfloat16" for the decode cache of the mixers (mixer.md 4).
    """

    model_type = "apriel_hybrid"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 8,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        rope_settings: dict | None = None,
        attention_bias: bool = False,
        attention_out_bias: bool | None = None,
        mlp_bias: bool = False,
        sliding_window: int | None = None,
        hybrid_block_layout: list[str] | None = None,
        ssm_cfg: dict | None = None,
        ssm_state_dtype: str = "float32",
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        **kwargs,
    ):
        # transformers 5 writes rope settings as rope_parameters = {"rope_type", "rope_theta", ...}.
        rope_scaling = rope_scaling or rope_settings  # rope_settings: our saved name (round trip)
        rope_parameters = kwargs.pop("rope_parameters", None)
        if rope_parameters:
            rope_parameters = dict(rope_parameters)
            rope_theta = rope_parameters.pop("rope_theta", rope_theta)
            rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            if rope_type != "default" and rope_scaling is None:
                rope_scaling = rope_parameters
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_scaling.setdefault("rope_type", rope_scaling.pop("type", "default"))
            if rope_scaling["rope_type"] == "default":
                rope_scaling = None
        for drop in ("use_sliding_window", "max_window_layers", "layer_types", "pretraining_tp"):
            kwargs.pop(drop, None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        self.rope_settings = rope_scaling  # not `rope_scaling`: transformers 5 owns that name as a property
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_bias if attention_out_bias is None else attention_out_bias
        self.mlp_bias = mlp_bias
        self.sliding_window = sliding_window
        layout = list(hybrid_block_layout) if hybrid_block_layout is not None else ["t"] * num_hidden_layers
        self.hybrid_block_layout = layout
        cfg = dict(SSM_DEFAULTS)
        cfg.update(ssm_cfg or {})
        self.ssm_cfg = cfg
        self.ssm_state_dtype = ssm_state_dtype
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_layout()

    # -------------------------------------------------------------------------------------------- checks
    def validate_layout(self) -> None:
        layout = self.hybrid_block_layout
        if len(layout) != self.num_hidden_layers:
            raise ValueError(
                f"hybrid_block_layout: expected {self.num_hidden_layers} codes (num_hidden_layers), got {len(layout)}"
            )
        bad = sorted({c for c in layout if c not in LAYOUT_CODES})
        if bad:
            raise ValueError(f"hybrid_block_layout: expected codes in {list(LAYOUT_CODES)}, got {bad}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: expected a divisor of num_attention_heads ({self.num_attention_heads}), "
                f"got {self.num_key_value_heads}"
            )
        if "m2" in layout:
            d_inner, d_xb, d_state, _, _ = self.mixer_dims()
            if d_xb % d_state or d_inner % d_xb:
                raise ValueError(
                    f"ssm_cfg: expected d_xb ({d_xb}) a multiple of d_state ({d_state}) and d_inner ({d_inner}) "
                    f"a multiple of d_xb"
                )

    def mixer_dims(self) -> tuple[int, int, int, int, int]:
        """(d_inner, d_xb, d_state, dt_rank, d_conv) with None / "auto" resolved."""
        c = self.ssm_cfg
        d_inner = c.get("d_inner") or self.num_attention_heads * self.head_dim
        d_xb = c.get("d_xb") or self.num_key_value_heads * self.head_dim
        dt_rank = c.get("dt_rank", 16)
        if dt_rank == "auto":  # the published default: ceil(d_model / 16)
            dt_rank = math.ceil(self.hidden_size / 16)
        return int(d_inner), int(d_xb), int(c["d_state"]), int(dt_rank), int(c["d_conv"])

    @property
    def layout_counts(self) -> dict[str, int]:
        return {code: self.hybrid_block_layout.count(code) for code in LAYOUT_CODES}


class AprielHConfig(AprielHybridConfig):
    """The published Apriel-H1 config (model_type "apriel_h"); same fields, read and written as is."""

    model_type = "apriel_h"

    def __init__(self, **kwargs):  # an explicit __init__: transformers 5 would generate a dataclass one
        super().__init__(**kwargs)


class AprielHybridSSMConfig(AprielHybridConfig):
    """Fast-LLM's export of the same model (model_type "apriel_hybrid_ssm")."""

    model_type = "apriel_hybrid_ssm"

    def __init__(self, **kwargs):  # an explicit __init__: transformers 5 would generate a dataclass one
        super().__init__(**kwargs)
