"""Dense decoder families (Llama, Mistral, Qwen2, Qwen3) as attention and FFN units.

A decoder layer is two units with one interface, ``unit(hidden, ctx) -> hidden``, where
``hidden`` is the residual stream [T, D]. The model is embedding, a flat list of units and the
LM head; a runner decides where each unit runs and calls it. Nothing here knows placement.
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.model.attention import paged_attention, write_kv
from tessera.model.context import StepContext
from tessera.model.kernels import silu_mul
from tessera.model.kernels.decode_units import decode_units_available, max_plain_rows
from tessera.model.kernels.paged_decode import decode_kernel_applies
from tessera.model.layers import RMSNorm, RotaryEmbedding, activation
from tessera.model.spec import ModelSpec
from tessera.model.weights import Target, dense_target


class AttentionUnit(nn.Module):
    """norm -> fused qkv -> (q/k norm) -> rope -> paged attention -> o_proj -> residual add."""

    kind = "attention"

    def __init__(self, spec: ModelSpec, layer_id: int, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size, self.kv_size = spec.q_size, spec.kv_size
        self.scale = spec.head_dim**-0.5
        self.window = (
            spec.sliding_window if spec.layer_sliding and spec.layer_sliding[layer_id] else None
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.qkv_proj = nn.Linear(
            spec.hidden_size, spec.q_size + 2 * spec.kv_size, bias=spec.qkv_bias
        )
        self.o_proj = nn.Linear(spec.q_size, spec.hidden_size, bias=spec.o_bias)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.rope = [rope]  # a list, so the shared rotary tables are not registered per layer

    def forward(self, hidden: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        kv_cache = ctx.kv_caches[self.layer_id]
        assert kv_cache is not None, f"no KV cache for layer {self.layer_id}"
        if (
            not ctx.attn.prefills
            and num_tokens <= min(max_plain_rows(self.qkv_proj), max_plain_rows(self.o_proj))
            and self.rope[0].fused
            and decode_units_available(hidden)
            and decode_kernel_applies(hidden, kv_cache)
        ):
            return self.fused_decode(hidden, ctx, kv_cache)
        qkv = self.qkv_proj(self.norm(hidden))  # [T, q + 2kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope[0](ctx.positions, q, k)
        write_kv(kv_cache, k, v, ctx.attn.slot_mapping)
        o = paged_attention(q, k, v, kv_cache, ctx.attn, self.scale, self.window)  # [T, H, d]
        # The residual add goes into the fresh projection output (no new [T, D] tensor).
        return self.o_proj(o.view(num_tokens, self.q_size)).add_(hidden)

    def fused_decode(
        self, hidden: torch.Tensor, ctx: StepContext, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        """``forward`` of a decode-only step in one native call (same ops, same result)."""
        meta, rope = ctx.attn, self.rope[0]
        assert meta.decode_block_tables is not None and meta.decode_seq_lens is not None
        return torch.ops.tessera_kernels.attention_decode(
            hidden, self.norm.weight, self.norm.eps,
            self.qkv_proj.weight, self.qkv_proj.bias,
            None if self.q_norm is None else self.q_norm.weight,
            None if self.k_norm is None else self.k_norm.weight,
            self.o_proj.weight, self.o_proj.bias,
            ctx.positions, rope.cos, rope.sin, kv_cache, meta.slot_mapping,
            meta.decode_block_tables, meta.decode_seq_lens,
            self.num_heads, self.num_kv_heads, self.scale, self.window or 0,
        )  # [B, D]


class DenseFFNUnit(nn.Module):
    """norm -> fused gate/up -> act(gate) * up -> down -> residual add."""

    kind = "ffn"

    def __init__(self, spec: ModelSpec, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        inter = spec.intermediate_size
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * inter, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(inter, spec.hidden_size, bias=spec.mlp_bias)
        self.act = activation(spec.hidden_act)
        self.fused_silu = spec.hidden_act == "silu"

    def forward(self, hidden: torch.Tensor, ctx: StepContext | None = None) -> torch.Tensor:
        if (
            self.fused_silu
            and hidden.shape[0]
            <= min(max_plain_rows(self.gate_up_proj), max_plain_rows(self.down_proj))
            and decode_units_available(hidden)
        ):
            # Few rows: the whole unit in one native call (same ops, same result).
            return torch.ops.tessera_kernels.ffn_decode(
                hidden, self.norm.weight, self.norm.eps,
                self.gate_up_proj.weight, self.gate_up_proj.bias,
                self.down_proj.weight, self.down_proj.bias,
            )  # [T, D]
        gate_up = self.gate_up_proj(self.norm(hidden))  # [T, 2I]
        if self.fused_silu:
            act = silu_mul(gate_up)  # [T, I], one pass
        else:
            gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
            act = self.act(gate) * up
        return self.down_proj(act).add_(hidden)  # residual add in place of a new tensor


class DecoderLayer(nn.Module):
    def __init__(self, attn: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.attn = attn
        self.ffn = ffn


class DecoderModel(nn.Module):
    """Embedding, decoder layers (attention unit + FFN unit each), final norm and LM head."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.rotary = self.make_rotary(spec)
        self.layers = nn.ModuleList(
            DecoderLayer(self.make_attention(spec, i), self.make_ffn(spec, i))
            for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def make_rotary(self, spec: ModelSpec) -> RotaryEmbedding:
        """The rotary tables shared by all attention units."""
        return RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope)

    def make_attention(self, spec: ModelSpec, layer_id: int) -> nn.Module:
        """The attention unit of a layer; families with another attention override this."""
        return AttentionUnit(spec, layer_id, self.rotary)

    def make_ffn(self, spec: ModelSpec, layer_id: int) -> nn.Module:
        """The FFN unit of a layer; MoE families override this."""
        return DenseFFNUnit(spec, layer_id)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of one layer's KV cache: K and V per KV head (MLA families override)."""
        spec = self.spec
        return (2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)

    def units(self) -> list[nn.Module]:
        """All units in execution order: attention 0, FFN 0, attention 1, ..."""
        units: list[nn.Module] = []
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            units += [layer.attn, layer.ffn]
        return units

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)  # [T, D]

    def checkpoint_target(self, name: str) -> Target | None:
        """Where checkpoint tensor ``name`` is loaded; None for a tensor this model lacks."""
        return dense_target(self.spec, name)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden)).float()  # [S, V]
