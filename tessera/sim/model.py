"""What a model's ops cost per token: parameter, FLOP and KV-cache counts per layer.

The shape comes from the engine's own readers of an HF ``config.json`` (``tessera.model.spec``,
``moe_spec`` and ``mla_spec``, all torch-free), so the simulator and the engine never disagree
on a model; this module only counts. Covered: GQA/MHA attention, MLA with low-rank query and
KV (DeepSeek-V2/V3, arXiv 2405.04434 and 2412.19437), dense SwiGLU FFN, MoE with top-k routed
and shared experts on the layers the config makes MoE, and multi-token prediction layers
(``num_nextn_predict_layers``, a field only the simulator reads: the engine runs no MTP).
Counts are multiply-accumulates times two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tessera.model.mla_spec import MLASpec, mla_spec_from_config
from tessera.model.moe_spec import MOE_MODEL_TYPES, MoESpec, moe_spec_from_config
from tessera.model.spec import ModelSpec, spec_from_config

from .catalog import load_model_config
from .errors import SimError

_EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")


@dataclass(frozen=True)
class ModelCosts:
    """Per-layer parameter and FLOP counts of one model, derived once from its config."""

    name: str
    num_layers: int
    num_dense_layers: int
    num_moe_layers: int
    num_mtp_layers: int
    hidden_size: int
    vocab_size: int
    is_mla: bool
    attn_params: int
    """Projection parameters of one attention layer (for MLA including the up-projections)."""
    attn_flops_per_kv_decode: int
    """FLOPs per query token per cached position in decode (MLA in absorbed form)."""
    attn_flops_per_pair_prefill: int
    """FLOPs per (query, key) pair in prefill (MLA in expanded form)."""
    kv_elements_per_token: int
    """Cached elements per token per layer (MLA: latent plus rope key; GQA: K and V heads)."""
    dense_ffn_params: int
    num_experts: int
    num_experts_per_token: int
    expert_params: int
    shared_expert_params: int
    router_params: int
    mtp_extra_params: int
    """Parameters of one MTP module besides its transformer layer (projection of two hiddens)."""
    tied_embeddings: bool = False
    kv_up_flops_per_context_token: int = 0
    """FLOPs per layer that a prefill chunk spends per token of cached context it attends to,
    besides the attention itself: MLA's expanded (prefill) form re-projects each cached latent
    into per-head keys and values; GQA/MHA cache them as they are (0)."""
    moe_layers: tuple[bool, ...] = ()
    """Per layer: is its FFN a MoE (empty: none is). The pool cost model needs only the counts;
    a schedule that walks the layers one by one (the AFD lab model) asks per layer."""

    def is_moe_layer(self, layer: int) -> bool:
        """True when layer ``layer``'s FFN is a MoE."""
        return bool(self.moe_layers) and self.moe_layers[layer]

    @property
    def is_moe(self) -> bool:
        """True when the model has routed experts."""
        return self.num_experts > 0

    @property
    def moe_layer_params(self) -> int:
        """Parameters of one MoE FFN (all routed and shared experts plus router)."""
        return self.num_experts * self.expert_params + self.shared_expert_params + self.router_params

    @property
    def embedding_params(self) -> int:
        """Input embedding plus output head (one matrix when tied)."""
        return (1 if self.tied_embeddings else 2) * self.vocab_size * self.hidden_size

    def total_params(self, with_mtp: bool = True) -> int:
        """All parameters (MTP modules included when ``with_mtp``)."""
        layers = self.num_layers * self.attn_params
        layers += self.num_dense_layers * self.dense_ffn_params
        layers += self.num_moe_layers * self.moe_layer_params
        total = layers + self.embedding_params
        if with_mtp and self.num_mtp_layers:
            ffn = self.moe_layer_params if self.is_moe else self.dense_ffn_params
            total += self.num_mtp_layers * (self.attn_params + ffn + self.mtp_extra_params)
        return total

    def active_params_per_token(self) -> int:
        """Parameters touched by one token in the main model (routed experts: top-k only)."""
        moe = self.num_experts_per_token * self.expert_params + self.shared_expert_params
        moe += self.router_params
        return (self.num_layers * self.attn_params + self.num_dense_layers * self.dense_ffn_params
                + self.num_moe_layers * moe + self.vocab_size * self.hidden_size)


def _attention_counts(spec: ModelSpec, mla: MLASpec | None) -> tuple[int, int, int, int, int]:
    """(projection params, decode FLOPs per cached position, prefill FLOPs per pair, cached
    elements per token, MLA re-expansion FLOPs per cached token) of one attention layer."""
    hidden, heads = spec.hidden_size, spec.num_heads
    if mla is None:
        hd = spec.head_dim
        return (hidden * hd * (2 * heads + 2 * spec.num_kv_heads), 4 * heads * hd,
                4 * heads * hd, 2 * spec.num_kv_heads * hd, 0)
    rank, rope, nope, v_dim = (mla.kv_lora_rank, mla.qk_rope_head_dim, mla.qk_nope_head_dim,
                               mla.v_head_dim)
    qk = mla.qk_head_dim
    q_lora = mla.q_lora_rank
    q_params = hidden * q_lora + q_lora * heads * qk if q_lora else hidden * heads * qk
    params = (q_params + hidden * (rank + rope) + rank * heads * (nope + v_dim)
              + heads * v_dim * hidden)
    return (params, 2 * heads * (rank + rope) + 2 * heads * rank,
            2 * heads * qk + 2 * heads * v_dim, mla.cache_dim, 2 * rank * heads * (nope + v_dim))


def _read(cfg: dict[str, Any]) -> tuple[ModelSpec, MoESpec | None, MLASpec | None, int]:
    spec = spec_from_config(cfg)
    moe = moe_spec_from_config(cfg)
    mla = mla_spec_from_config(spec) if cfg.get("kv_lora_rank") is not None else None
    return spec, moe, mla, int(cfg.get("num_nextn_predict_layers") or 0)


def costs_from_config(cfg: dict[str, Any], name: str = "model") -> ModelCosts:
    """The :class:`ModelCosts` of an HF config dict (raises :class:`SimError` if unusable)."""
    try:
        spec, moe, mla, num_mtp = _read(cfg)
        has_experts = any(int(cfg.get(k) or 0) > 0 for k in _EXPERT_COUNT_KEYS)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # ModelConfigError too
        raise SimError(f"model config {name!r} is not usable: {exc}") from exc
    model_type = cfg.get("model_type", "")
    if moe is None and has_experts and model_type not in MOE_MODEL_TYPES:
        # Read as dense, every expert would cost like one dense FFN: fail instead.
        raise SimError(f"model config {name!r} has routed experts, but model_type "
                       f"{model_type!r} is not one whose experts Tessera reads "
                       f"({', '.join(MOE_MODEL_TYPES)})")
    hidden = spec.hidden_size
    moe_layers = moe.moe_layers if moe is not None else ()
    num_moe = sum(moe_layers)
    num_dense = spec.num_layers - num_moe
    if (num_dense or (num_mtp and moe is None)) and spec.intermediate_size <= 0:
        raise SimError(f"model config {name!r} has dense FFN layers but no intermediate_size")
    attn_params, kv_decode, pair_prefill, kv_elements, kv_up = _attention_counts(spec, mla)
    num_experts = moe.num_experts if moe is not None else 0
    return ModelCosts(
        name=name,
        num_layers=spec.num_layers,
        num_dense_layers=num_dense,
        num_moe_layers=num_moe,
        num_mtp_layers=num_mtp,
        hidden_size=hidden,
        vocab_size=spec.vocab_size,
        is_mla=mla is not None,
        attn_params=attn_params,
        attn_flops_per_kv_decode=kv_decode,
        attn_flops_per_pair_prefill=pair_prefill,
        kv_elements_per_token=kv_elements,
        dense_ffn_params=3 * hidden * spec.intermediate_size,
        num_experts=num_experts,
        num_experts_per_token=moe.top_k if moe is not None else 0,
        expert_params=3 * hidden * moe.moe_intermediate_size if moe is not None else 0,
        shared_expert_params=3 * hidden * moe.shared_intermediate_size if moe is not None else 0,
        router_params=hidden * num_experts,
        mtp_extra_params=2 * hidden * hidden,
        tied_embeddings=spec.tie_word_embeddings,
        kv_up_flops_per_context_token=kv_up,
        moe_layers=moe_layers,
    )


def load_model(name_or_path: str) -> ModelCosts:
    """The costs of a bundled model (by name) or of an HF config (by path)."""
    return costs_from_config(load_model_config(name_or_path), name=name_or_path)
