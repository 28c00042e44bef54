"""Multi-head latent attention unit (DeepSeek-V2/V3, Kimi-K2); its shape: ``mla_spec.MLASpec``.

q: ``q_a_proj -> q_a_layernorm -> q_b_proj`` (or ``q_proj`` without a q LoRA rank), split into
a no-position part and a rope part per head. kv: ``kv_a_proj_with_mqa`` gives the KV latent
(normalised by ``kv_a_layernorm``) and one rope key shared by all heads; only these two are
cached (see ``tessera.model.mla_attention``).
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.model.context import StepContext
from tessera.model.layers import RMSNorm, RotaryEmbedding
from tessera.model.mla_attention import absorbed_decode, expanded_prefill, write_latent
from tessera.model.mla_spec import MLASpec
from tessera.model.spec import ModelSpec

# HF DeepSeek builds q_a_layernorm and kv_a_layernorm with the default eps, not rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


class MLAAttentionUnit(nn.Module):
    """norm -> q / kv-latent projections -> rope -> latent cache -> MLA -> o_proj -> residual."""

    kind = "attention"
    # Its weight is read directly (folded into the query and output), so it keeps the plain
    # layout when the other projections are packed (see ``kernels.linear.pack_linears``).
    keep_plain_linears = ("kv_b_proj",)

    def __init__(
        self, spec: ModelSpec, mla: MLASpec, layer_id: int, rope: RotaryEmbedding
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.mla = mla
        h, num_heads, bias = spec.hidden_size, mla.num_heads, mla.attention_bias
        self.norm = RMSNorm(h, spec.rms_norm_eps)
        q_out = num_heads * mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(h, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, mla.cache_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            mla.kv_lora_rank, num_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(num_heads * mla.v_head_dim, h, bias=bias)
        self.rope = [rope]  # a list, so the shared rotary tables are not registered per layer

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.mla.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # [T, H * qk]

    def forward(self, hidden: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        mla, meta = self.mla, ctx.attn
        num_tokens = hidden.shape[0]
        x = self.norm(hidden)
        q = self._query(x).view(num_tokens, mla.num_heads, mla.qk_head_dim)
        q_nope, q_rope = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split(
            [mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1
        )  # [T, r], [T, dr]
        latent = self.kv_a_layernorm(latent)
        q_rope, k_rope = self.rope[0](ctx.positions, q_rope, k_rope.unsqueeze(1))
        k_rope = k_rope.squeeze(1)  # [T, dr]
        kv_cache = ctx.kv_caches[self.layer_id]
        assert kv_cache is not None, f"no KV cache for layer {self.layer_id}"
        write_latent(kv_cache, latent, k_rope, meta.slot_mapping)

        w_kv = self.kv_b_proj.weight  # [H * (nope + v), r]
        out = q.new_empty(num_tokens, mla.num_heads, mla.v_head_dim)
        num_decodes = meta.num_decode_tokens
        if num_decodes:
            assert meta.decode_block_tables is not None and meta.decode_seq_lens is not None
            out[:num_decodes] = absorbed_decode(
                q_nope[:num_decodes], q_rope[:num_decodes], kv_cache,
                meta.decode_block_tables, meta.decode_seq_lens, w_kv, mla.v_head_dim,
                mla.softmax_scale,
            )  # [B, H, v]
        for chunk in meta.prefills:
            s, n, num_ctx = chunk.start, chunk.num_tokens, chunk.num_context_tokens
            if num_ctx == 0:
                seq_latent, seq_rope = latent[s : s + n], k_rope[s : s + n]
            else:
                total = num_ctx + n
                cached = kv_cache.index_select(0, chunk.block_ids)
                cached = cached.view(-1, mla.cache_dim)[:total].to(q.dtype)  # [total, r + dr]
                seq_latent, seq_rope = cached.split([mla.kv_lora_rank, mla.qk_rope_head_dim], -1)
            out[s : s + n] = expanded_prefill(
                q_nope[s : s + n], q_rope[s : s + n], seq_latent, seq_rope, w_kv,
                mla.v_head_dim, num_ctx, mla.softmax_scale,
            )  # [n, H, v]
        return hidden + self.o_proj(out.view(num_tokens, mla.num_heads * mla.v_head_dim))
