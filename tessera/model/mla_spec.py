"""The MLA shape of a DeepSeek-style config (DeepSeek-V2/V3, Kimi-K2), read and checked once.

Pure Python (no torch): the engine's MLA unit (``tessera.model.mla``) and the simulator's cost
model (``tessera.sim.model``) both read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tessera.model.spec import ModelConfigError, ModelSpec, yarn_mscale


@dataclass(frozen=True)
class MLASpec:
    """MLA shape of a DeepSeek-style config."""

    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool
    rope_interleaved: bool
    softmax_scale: float

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Values cached per token per layer: the KV latent plus the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def _positive_int(cfg: dict, key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelConfigError(f"config.json field {key!r} must be a positive integer, not {value!r}")
    return value


def mla_spec_from_config(spec: ModelSpec) -> MLASpec:
    """Read the MLA fields of ``spec.raw``; raises ``ModelConfigError`` on bad values."""
    cfg = spec.raw or {}
    q_lora_rank = cfg.get("q_lora_rank")
    if q_lora_rank is not None:
        q_lora_rank = _positive_int(cfg, "q_lora_rank")
    rope_dim = _positive_int(cfg, "qk_rope_head_dim")
    if rope_dim % 2:
        raise ModelConfigError(f"qk_rope_head_dim must be even, not {rope_dim}")
    nope_dim = _positive_int(cfg, "qk_nope_head_dim")
    scale = (nope_dim + rope_dim) ** -0.5
    rope = spec.rope
    if rope.rope_type != "default" and rope.mscale_all_dim:
        # YaRN's temperature, applied to the softmax scale as HF's `yarn_apply_mscale` does.
        scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return MLASpec(
        num_heads=spec.num_heads,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=_positive_int(cfg, "kv_lora_rank"),
        qk_nope_head_dim=nope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=_positive_int(cfg, "v_head_dim"),
        attention_bias=bool(cfg.get("attention_bias", False)),
        # DeepSeek-V2 always rotates interleaved pairs; V3 configs say so (default true).
        rope_interleaved=spec.model_type == "deepseek_v2" or bool(cfg.get("rope_interleave", True)),
        softmax_scale=scale,
    )
