"""Model shapes from an HF ``config.json`` and the FLOPs/bytes of each op per token.

Covered: GQA/MHA attention (Llama, Qwen, Mixtral), MLA with low-rank query and KV
(DeepSeek-V2/V3, arXiv 2405.04434 and 2412.19437), dense SwiGLU FFN, MoE with top-k routed
experts and shared experts, dense-first layers (``first_k_dense_replace``) and multi-token
prediction layers (``num_nextn_predict_layers``). Counts are multiply-accumulates times two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .catalog import load_model_config
from .errors import SimError


@dataclass(frozen=True)
class ModelSpec:
    """Per-layer parameter and FLOP counts derived once from a config."""

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


def _get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
    return default


def spec_from_config(cfg: dict[str, Any], name: str = "model") -> ModelSpec:
    """Derive a :class:`ModelSpec` from an HF config dict (raises :class:`SimError` if unusable)."""
    try:
        hidden = int(cfg["hidden_size"])
        num_layers = int(cfg["num_hidden_layers"])
        num_heads = int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SimError(f"model config {name!r} lacks a usable field: {exc}") from exc
    num_kv_heads = int(_get(cfg, "num_key_value_heads", default=num_heads))
    kv_lora = int(_get(cfg, "kv_lora_rank", default=0))
    if kv_lora:
        q_lora = int(_get(cfg, "q_lora_rank", default=0))
        rope = int(cfg["qk_rope_head_dim"])
        nope = int(cfg["qk_nope_head_dim"])
        v_dim = int(cfg["v_head_dim"])
        qk_dim = rope + nope
        q_params = hidden * q_lora + q_lora * num_heads * qk_dim if q_lora else hidden * num_heads * qk_dim
        attn_params = (q_params + hidden * (kv_lora + rope) + kv_lora * num_heads * (nope + v_dim)
                       + num_heads * v_dim * hidden)
        flops_kv_decode = 2 * num_heads * (kv_lora + rope) + 2 * num_heads * kv_lora
        flops_pair_prefill = 2 * num_heads * qk_dim + 2 * num_heads * v_dim
        kv_elements = kv_lora + rope
        kv_up_flops = 2 * kv_lora * num_heads * (nope + v_dim)
    else:
        head_dim = int(_get(cfg, "head_dim", default=hidden // num_heads))
        attn_params = hidden * head_dim * (2 * num_heads + 2 * num_kv_heads)
        flops_kv_decode = 4 * num_heads * head_dim
        flops_pair_prefill = 4 * num_heads * head_dim
        kv_elements = 2 * num_kv_heads * head_dim
        kv_up_flops = 0
    intermediate = int(_get(cfg, "intermediate_size", default=4 * hidden))
    num_experts = int(_get(cfg, "n_routed_experts", "num_experts", "num_local_experts", default=0))
    top_k = int(_get(cfg, "num_experts_per_tok", default=0)) if num_experts else 0
    moe_inter = int(_get(cfg, "moe_intermediate_size", default=intermediate))
    n_shared = int(_get(cfg, "n_shared_experts", default=0))
    shared_inter = int(_get(cfg, "shared_expert_intermediate_size", default=n_shared * moe_inter))
    if num_experts:
        first_dense = int(_get(cfg, "first_k_dense_replace", default=0))
        mlp_only = list(_get(cfg, "mlp_only_layers", default=[]))
        num_dense = min(num_layers, first_dense + len(mlp_only))
    else:
        num_dense = num_layers
    return ModelSpec(
        name=name,
        num_layers=num_layers,
        num_dense_layers=num_dense,
        num_moe_layers=num_layers - num_dense,
        num_mtp_layers=int(_get(cfg, "num_nextn_predict_layers", default=0)),
        hidden_size=hidden,
        vocab_size=vocab,
        is_mla=bool(kv_lora),
        attn_params=attn_params,
        attn_flops_per_kv_decode=flops_kv_decode,
        attn_flops_per_pair_prefill=flops_pair_prefill,
        kv_elements_per_token=kv_elements,
        dense_ffn_params=3 * hidden * intermediate,
        num_experts=num_experts,
        num_experts_per_token=top_k,
        expert_params=3 * hidden * moe_inter if num_experts else 0,
        shared_expert_params=3 * hidden * shared_inter if num_experts else 0,
        router_params=hidden * num_experts,
        mtp_extra_params=2 * hidden * hidden,
        tied_embeddings=bool(_get(cfg, "tie_word_embeddings", default=False)),
        kv_up_flops_per_context_token=kv_up_flops,
    )


def load_model(name_or_path: str) -> ModelSpec:
    """Load a bundled model by name or an HF config by path."""
    cfg = load_model_config(name_or_path)
    return spec_from_config(cfg, name=name_or_path)
