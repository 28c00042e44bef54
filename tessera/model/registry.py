"""Which model class serves which HF architecture name."""

from __future__ import annotations

from torch import nn

from tessera.model.deepseek import DeepseekModel
from tessera.model.dense import DecoderModel
from tessera.model.moe_models import MOE_ARCHITECTURES
from tessera.model.spec import ModelConfigError, ModelSpec

_ARCHITECTURES: dict[str, type[DecoderModel]] = {
    "LlamaForCausalLM": DecoderModel,
    "MistralForCausalLM": DecoderModel,
    "Qwen2ForCausalLM": DecoderModel,
    "Qwen3ForCausalLM": DecoderModel,
    **MOE_ARCHITECTURES,
    "DeepseekV2ForCausalLM": DeepseekModel,
    "DeepseekV3ForCausalLM": DeepseekModel,
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def model_class(spec: ModelSpec) -> type[DecoderModel]:
    cls = _ARCHITECTURES.get(spec.architecture)
    if cls is None:
        raise ModelConfigError(
            f"unsupported architecture {spec.architecture!r} "
            f"(supported: {', '.join(supported_architectures())})"
        )
    return cls


def register(architecture: str, cls: type[DecoderModel]) -> None:
    """Add a model class (used by model families defined in other modules)."""
    _ARCHITECTURES[architecture] = cls


__all__ = ["model_class", "register", "supported_architectures", "nn"]
