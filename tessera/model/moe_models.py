"""MoE decoder families (Mixtral, Qwen2-MoE, Qwen3-MoE): dense attention, MoE FFN units.

Each layer's FFN unit is a ``MoEFFNUnit`` where the config marks the layer sparse and a
``DenseFFNUnit`` otherwise (Qwen's ``decoder_sparse_step`` / ``mlp_only_layers``, DeepSeek's
``first_k_dense_replace``). Attention differences (qkv bias, q/k norm) live in ``ModelSpec``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from tessera.model.dense import DecoderLayer, DecoderModel, DenseFFNUnit
from tessera.model.kernels.small_linear import small_linear
from tessera.model.moe import MoEFFNUnit
from tessera.model.moe_spec import MoESpec, moe_spec_from_config
from tessera.model.spec import ModelConfigError, ModelSpec
from tessera.model.weights import Target, dense_target

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class MoEDecoderModel(DecoderModel):
    """A decoder whose sparse layers have MoE FFN units holding ``expert_ids`` (default all).

    Subclasses that change attention (DeepSeek MLA) keep this FFN side as it is.
    """

    moe: MoESpec | None
    expert_ids: tuple[int, ...] | None

    def __init__(self, spec: ModelSpec, expert_ids: Sequence[int] | None = None) -> None:
        # Set before DecoderModel.__init__, which calls make_ffn for every layer.
        self.moe = moe_spec_from_config(spec.raw or {})
        self.expert_ids = tuple(expert_ids) if expert_ids is not None else None
        if self.moe is not None and len(self.moe.moe_layers) != spec.num_layers:
            raise ModelConfigError("MoE layer pattern does not match num_hidden_layers")
        super().__init__(spec)

    def make_ffn(self, spec: ModelSpec, layer_id: int) -> nn.Module:
        if self.moe is not None and self.moe.is_moe_layer(layer_id):
            return MoEFFNUnit(spec, self.moe, layer_id, self.expert_ids)
        return DenseFFNUnit(spec, layer_id)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, D] -> float32 logits [S, V]; the LM head streams its weight once for the
        few rows of a decode step (see ``small_linear``)."""
        return small_linear(self.norm(hidden), self.lm_head.weight).float()  # [S, V]

    def checkpoint_target(self, name: str) -> Target | None:
        m = _LAYER.match(name)
        if m and int(m.group(1)) < self.spec.num_layers:
            layer = self.layers[int(m.group(1))]
            assert isinstance(layer, DecoderLayer)
            if isinstance(layer.ffn, MoEFFNUnit):
                target = layer.ffn.checkpoint_target(m.group(2), f"layers.{m.group(1)}.ffn")
                if target is not None:
                    return target
        return dense_target(self.spec, name)


MOE_ARCHITECTURES: dict[str, type[DecoderModel]] = {
    "MixtralForCausalLM": MoEDecoderModel,
    "Qwen2MoeForCausalLM": MoEDecoderModel,
    "Qwen3MoeForCausalLM": MoEDecoderModel,
}
