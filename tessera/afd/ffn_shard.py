"""The FFN side of every layer held by one FFN worker: dense shards and MoE expert shards.

Dense FFNs are split along the intermediate dimension across the F FFN workers (rows of the
fused gate/up projection, columns of the down projection), not replicated: each worker holds
1/F of the FFN weights, every attention worker's tokens use all F workers whatever the A:F
ratio (no idle replicas when A < F), and the attention worker sums the F partials. The
residual add and the FFN's input norm stay on the attention worker, so a request carries the
normed hidden state and a reply is a bare partial ``down(act(gate) * up)``. Only shard 0
holds the down projection's bias, so it is added once.

MoE layers are split by expert (see ``placement.py``): the worker holds the layer's
``MoEFFNUnit`` loaded with only its experts and returns ``experts_forward`` over them for the
tokens routed there (ids and weights come from the router on the attention worker); worker 0
also adds the shared expert. Every shard is called as ``shard(normed, topk_ids, topk_weights)``.
With part of the LM head on the FFN workers, its ``HeadSlice`` follows the layers' shards.
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.afd.head_slice import HeadSlice
from tessera.afd.placement import shard_range
from tessera.model.dense import DecoderModel, DenseFFNUnit
from tessera.model.layers import activation
from tessera.model.moe import MoEFFNUnit


class DenseFFNShard(nn.Module):
    """Rows ``[start, end)`` of one layer's intermediate dimension."""

    def __init__(self, unit: DenseFFNUnit, start: int, end: int, keep_bias: bool,
                 hidden_act: str) -> None:
        super().__init__()
        inter = unit.down_proj.in_features
        gu = unit.gate_up_proj
        rows = torch.cat([torch.arange(start, end), torch.arange(inter + start, inter + end)])
        self.gate_up = nn.Linear(gu.in_features, 2 * (end - start), bias=gu.bias is not None)
        self.gate_up.weight = nn.Parameter(gu.weight.detach()[rows].clone(), requires_grad=False)
        if gu.bias is not None:
            self.gate_up.bias = nn.Parameter(gu.bias.detach()[rows].clone(), requires_grad=False)
        down = unit.down_proj
        self.down = nn.Linear(end - start, down.out_features, bias=keep_bias and down.bias is not None)
        self.down.weight = nn.Parameter(
            down.weight.detach()[:, start:end].contiguous(), requires_grad=False
        )
        if keep_bias and down.bias is not None:
            self.down.bias = nn.Parameter(down.bias.detach().clone(), requires_grad=False)
        self.act = activation(hidden_act)

    def forward(self, normed: torch.Tensor, topk_ids: torch.Tensor | None = None,
                topk_weights: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = self.gate_up(normed).chunk(2, dim=-1)  # [T, I/F] each
        return self.down(self.act(gate) * up)  # [T, D] partial


class MoEShard(nn.Module):
    """One MoE layer's experts held here (and the shared expert on worker 0)."""

    def __init__(self, unit: MoEFFNUnit, with_shared: bool) -> None:
        super().__init__()
        self.unit = unit
        self.with_shared = with_shared

    def forward(self, normed: torch.Tensor, topk_ids: torch.Tensor | None = None,
                topk_weights: torch.Tensor | None = None) -> torch.Tensor:
        assert topk_ids is not None and topk_weights is not None, "MoE layer without routing"
        out = self.unit.experts_forward(normed, topk_ids, topk_weights)  # [T, D]
        if self.with_shared:
            shared = self.unit.shared_forward(normed)
            if shared is not None:
                out = out + shared
        return out


def ffn_shards(model: DecoderModel, num_shards: int, index: int,
               head_rows: tuple[int, int] | None = None) -> list[nn.Module]:
    """This worker's part of every layer's FFN (``model`` loaded with this worker's experts),
    then, given ``head_rows``, its slice of the LM head (``placement.head_split``)."""
    spec = model.spec
    if num_shards > spec.intermediate_size:
        raise ValueError(
            f"ffn_workers ({num_shards}) exceeds the FFN intermediate size "
            f"({spec.intermediate_size})"
        )
    start, end = shard_range(spec.intermediate_size, num_shards, index)
    shards: list[nn.Module] = []
    for unit in model.units()[1::2]:
        if isinstance(unit, MoEFFNUnit):
            shards.append(MoEShard(unit, index == 0))
        elif isinstance(unit, DenseFFNUnit):
            shards.append(DenseFFNShard(unit, start, end, index == 0, spec.hidden_act))
        else:
            raise ValueError(f"FFN unit {type(unit).__name__} cannot be placed on FFN workers")
    if head_rows is not None:
        shards.append(HeadSlice(model.lm_head, *head_rows))
    return shards
