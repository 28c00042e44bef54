"""DeepSeek-V2/V3 (and Kimi-K2, which uses the V3 architecture): MLA attention units, dense
FFN units for the first ``first_k_dense_replace`` layers, MoE FFN units after them (every
``moe_layer_freq``-th layer), as ``MoEDecoderModel`` builds them."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from tessera.model.layers import RotaryEmbedding
from tessera.model.mla import MLAAttentionUnit
from tessera.model.mla_spec import MLASpec, mla_spec_from_config
from tessera.model.moe_models import MoEDecoderModel
from tessera.model.spec import ModelSpec
from tessera.model.weights import SKIP, Target

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_ATTN = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(\w+)\.(weight|bias)$")


class DeepseekModel(MoEDecoderModel):
    """A DeepSeek-V2/V3 decoder; its KV cache holds one latent + rope key per token."""

    mla: MLASpec

    def __init__(self, spec: ModelSpec, expert_ids: Sequence[int] | None = None) -> None:
        # Set before DecoderModel.__init__, which builds the rotary tables and the units.
        self.mla = mla_spec_from_config(spec)
        super().__init__(spec, expert_ids)

    def make_rotary(self, spec: ModelSpec) -> RotaryEmbedding:
        return RotaryEmbedding(
            self.mla.qk_rope_head_dim,
            spec.max_position_embeddings,
            spec.rope,
            interleaved=self.mla.rope_interleaved,
        )

    def make_attention(self, spec: ModelSpec, layer_id: int) -> nn.Module:
        return MLAAttentionUnit(spec, self.mla, layer_id, self.rotary)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.mla.cache_dim)

    def checkpoint_target(self, name: str) -> Target | None:
        layer = _LAYER.match(name)
        if layer is not None and int(layer.group(1)) >= self.spec.num_layers:
            # Multi-token-prediction layers follow the decoder layers (V3's layer 61); like
            # HF, plain decoding does not use them.
            return SKIP
        m = _ATTN.match(name)
        if m is None:
            return super().checkpoint_target(name)  # embeddings, norms, dense and MoE FFNs
        layer_id, module, kind = int(m.group(1)), m.group(2), m.group(3)
        # Attention tensors keep their HF names inside the unit, one parameter each.
        param = f"layers.{layer_id}.attn.{module}.{kind}"
        try:
            rows = self.get_parameter(param).shape[0]
        except AttributeError:
            return None
        return Target(param, 0, rows)
