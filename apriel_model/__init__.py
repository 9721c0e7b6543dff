"""apriel_model: the Apriel-H1-style hybrid decoder (attention + Mamba mixer layers) on apriel_kernels ops.

Importing registers the config/model classes with transformers' Auto classes for model_type
"apriel_hybrid" (ours), "apriel_h" (the published Apriel-H1 format) and "apriel_hybrid_ssm" (Fast-LLM's
export), so `AutoModelForCausalLM.from_pretrained(dir)` opens all three without remote code.

Entry points: AprielHybridConfig, AprielHybridForCausalLM, convert.convert_to_hybrid,
embedded.load_embedded_teacher, checkpoint.{save_hybrid, load_hybrid}, presets.get_preset,
engine.Engine / generate.generate, cache.HybridCache.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .cache import HybridCache
from .configuration import AprielHConfig, AprielHybridConfig, AprielHybridSSMConfig
from .modeling import AprielHForCausalLM, AprielHybridForCausalLM, AprielHybridModel, AprielHybridSSMForCausalLM

for _config_cls, _model_cls in (
    (AprielHybridConfig, AprielHybridForCausalLM),
    (AprielHConfig, AprielHForCausalLM),
    (AprielHybridSSMConfig, AprielHybridSSMForCausalLM),
):
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)

__all__ = [
    "AprielHConfig",
    "AprielHForCausalLM",
    "AprielHybridConfig",
    "AprielHybridForCausalLM",
    "AprielHybridModel",
    "AprielHybridSSMConfig",
    "AprielHybridSSMForCausalLM",
    "HybridCache",
]
