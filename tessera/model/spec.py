"""Architecture facts read from a Hugging Face ``config.json``, checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class ModelConfigError(ValueError):
    """A config.json the engine cannot serve; the message names the problem."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters (HF ``rope_parameters`` or legacy ``rope_scaling``)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # YaRN (HF ``_compute_yarn_parameters``); unused by the other rope types.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    """Scale of the cos/sin tables; None derives it from ``factor`` and the mscales."""
    truncate: bool = True


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only model, independent of where its units run."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_sliding: tuple[bool, ...] = ()
    """Per layer: does it use the sliding window (empty means no layer does)."""
    checkpoint_dtype: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    raw: Any = None
    """The whole config dict, for architectures that read more fields (MoE, MLA)."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context extended ``scale`` times."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _rope_from(cfg: dict[str, Any]) -> RopeSpec:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ModelConfigError(
            f"unsupported rope_type {rope_type!r} (supported: {', '.join(_ROPE_TYPES)})"
        )
    original_max = params.get("original_max_position_embeddings")
    factor = params.get("factor")
    if rope_type == "yarn":
        if original_max is None:
            raise ModelConfigError("yarn rope_scaling lacks 'original_max_position_embeddings'")
        if factor is None:  # as HF: the context extension ratio
            factor = int(cfg.get("max_position_embeddings", 4096)) / int(original_max)
    return RopeSpec(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(1.0 if factor is None else factor),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original_max,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=_optional_float(params.get("mscale")),
        mscale_all_dim=_optional_float(params.get("mscale_all_dim")),
        attention_factor=_optional_float(params.get("attention_factor")),
        truncate=bool(params.get("truncate", True)),
    )


def _require(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ModelConfigError(f"config.json lacks {key!r}")
    return cfg[key]


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


# Families whose q/k/v projections have a bias and o_proj none (Qwen2-MoE: ``qkv_bias``).
_QKV_BIAS_ONLY = ("qwen2", "qwen2_moe")


def _qkv_bias(cfg: dict[str, Any], model_type: str) -> bool:
    if model_type in _QKV_BIAS_ONLY:
        return bool(cfg.get("qkv_bias", True))
    return bool(cfg.get("attention_bias", False))


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    """Build a ``ModelSpec`` from a config dict; raises ``ModelConfigError`` on bad fields."""
    archs = cfg.get("architectures") or []
    if not archs:
        raise ModelConfigError("config.json has no 'architectures' entry")
    arch = archs[0]
    model_type = cfg.get("model_type", "")
    hidden = int(_require(cfg, "hidden_size"))
    num_heads = int(_require(cfg, "num_attention_heads"))
    num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    num_layers = int(_require(cfg, "num_hidden_layers"))
    if num_heads % num_kv_heads:
        raise ModelConfigError(
            f"num_attention_heads ({num_heads}) is not a multiple of "
            f"num_key_value_heads ({num_kv_heads})"
        )
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    qwen_family = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
    if model_type in qwen_family and not cfg.get("use_sliding_window", False):
        window = None
    if window is not None:
        if layer_types:
            layer_sliding = tuple(t == "sliding_attention" for t in layer_types)
        else:
            layer_sliding = (True,) * num_layers
        if not any(layer_sliding):
            window = None
    layer_sliding = layer_sliding if window is not None else ()
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "gelu", "gelu_pytorch_tanh"):
        raise ModelConfigError(f"unsupported hidden_act {act!r}")
    return ModelSpec(
        architecture=arch,
        model_type=model_type,
        vocab_size=int(_require(cfg, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope=_rope_from(cfg),
        hidden_act=act,
        qkv_bias=_qkv_bias(cfg, model_type),
        o_bias=bool(cfg.get("attention_bias", False)) and model_type not in _QKV_BIAS_ONLY,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=int(window) if window is not None else None,
        layer_sliding=layer_sliding,
        checkpoint_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        raw=cfg,
    )
