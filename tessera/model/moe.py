"""The FFN unit of a mixture-of-experts layer: norm -> router -> experts (+ shared) -> residual.

``MoEFFNUnit`` has the same interface as the dense FFN unit, ``unit(hidden, ctx) -> hidden``,
and also exposes its stages so an expert-parallel placement can run them apart:
``route(normed)`` on the attention side, ``experts_forward(normed, ids, weights)`` on each
expert shard (partial sums over the shard's experts), ``shared_forward(normed)`` anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from tessera.model.context import StepContext
from tessera.model.experts import Experts
from tessera.model.layers import RMSNorm, activation
from tessera.model.moe_spec import MoESpec, moe_spec_from_config
from tessera.model.router import Router
from tessera.model.spec import ModelSpec
from tessera.model.weights import SKIP, Target


class GatedMLP(nn.Module):
    """act(gate) * up -> down with fused gate/up, no norm or residual (a shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each
        return self.down_proj(self.act(gate) * up)  # [T, D]


class MoEFFNUnit(nn.Module):
    """norm -> router -> routed experts (+ shared expert, optionally sigmoid-gated) -> residual.

    ``expert_ids`` (global ids; default all) are the routed experts this unit holds; with a
    subset, ``forward`` adds only their share, so the units of a partition sum to the layer.
    """

    kind = "ffn"

    def __init__(
        self,
        spec: ModelSpec,
        moe: MoESpec,
        layer_id: int,
        expert_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.moe = moe
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.router = Router(moe)
        self.experts = Experts(moe, expert_ids)
        self.shared_expert = (
            GatedMLP(moe.hidden_size, moe.shared_intermediate_size, moe.hidden_act)
            if moe.shared_intermediate_size
            else None
        )
        self.shared_expert_gate = (
            nn.Linear(moe.hidden_size, 1, bias=False)
            if moe.shared_gate and self.shared_expert is not None
            else None
        )

    def route(self, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """normed [T, D] -> (topk_ids [T, k] int64, topk_weights [T, k] float32)."""
        return self.router(normed)

    def experts_forward(
        self, normed: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """[T, D] partial sum over the experts this unit holds."""
        return self.experts(normed, topk_ids, topk_weights)

    def shared_forward(self, normed: torch.Tensor) -> torch.Tensor | None:
        """[T, D] shared-expert output (gated where the family gates it); None if none."""
        if self.shared_expert is None:
            return None
        out = self.shared_expert(normed)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(normed)) * out  # [T, 1] * [T, D]
        return out

    def forward(self, hidden: torch.Tensor, ctx: StepContext | None = None) -> torch.Tensor:
        normed = self.norm(hidden)  # [T, D]
        topk_ids, topk_weights = self.route(normed)
        out = self.experts_forward(normed, topk_ids, topk_weights)
        shared = self.shared_forward(normed)
        if shared is not None:
            out = out + shared
        return hidden + out

    def checkpoint_target(self, name: str, prefix: str) -> Target | None:
        """Where this layer's MoE tensor ``name`` goes (``name`` is relative to the layer,
        e.g. ``mlp.experts.3.up_proj.weight``; ``prefix`` is this unit's parameter prefix).
        ``SKIP`` for experts held elsewhere; None for a tensor this unit does not know."""
        return moe_checkpoint_target(self, name, prefix)


_EXPERT = re.compile(r"^experts\.(\d+)\.(\w+)\.weight$")
_SHARED = re.compile(r"^shared_experts?\.(gate_proj|up_proj|down_proj)\.weight$")
# Mixtral's checkpoints name the block ``block_sparse_moe`` and its projections w1/w3/w2.
_MOE_PREFIX = re.compile(r"^(?:mlp|block_sparse_moe)\.(.+)$")
_GATE_PROJ, _UP_PROJ, _DOWN_PROJ = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")


def moe_checkpoint_target(unit: MoEFFNUnit, name: str, prefix: str) -> Target | None:
    """Map HF MoE tensor names, per-expert (hub checkpoints) or stacked (``experts.gate_up_proj``
    [E, 2I, D] / ``experts.down_proj`` [E, D, I]), onto ``unit``'s parameters."""
    m = _MOE_PREFIX.match(name)
    if not m:
        return None
    rest, moe = m.group(1), unit.moe
    inter, hidden = moe.moe_intermediate_size, moe.hidden_size
    if rest == "gate.weight":
        return Target(f"{prefix}.router.weight", 0, moe.num_experts)
    if rest in ("gate.e_score_correction_bias", "e_score_correction_bias"):
        if unit.router.e_score_correction_bias is None:
            return None
        return Target(f"{prefix}.router.e_score_correction_bias", 0, moe.num_experts)
    experts = unit.experts
    e = _EXPERT.match(rest)
    if e:
        global_id, proj = int(e.group(1)), e.group(2)
        if global_id >= moe.num_experts:
            return None
        local = experts.local_index(global_id)
        if proj in _GATE_PROJ + _UP_PROJ + _DOWN_PROJ and local is None:
            return SKIP
        if proj in _GATE_PROJ:
            return Target(f"{prefix}.experts.gate_up_proj", 0, inter, expert=local)
        if proj in _UP_PROJ:
            return Target(f"{prefix}.experts.gate_up_proj", inter, inter, expert=local)
        if proj in _DOWN_PROJ:
            return Target(f"{prefix}.experts.down_proj", 0, hidden, expert=local)
        return None
    stacked = {"experts.gate_up_proj": ("gate_up_proj", 2 * inter),
               "experts.down_proj": ("down_proj", hidden)}
    if rest in stacked:
        param, rows = stacked[rest]
        return Target(f"{prefix}.experts.{param}", 0, rows,
                      source_experts=experts.expert_ids, num_source_experts=moe.num_experts)
    s = _SHARED.match(rest)
    if s and unit.shared_expert is not None:
        shared_inter = moe.shared_intermediate_size
        offset, rows = {"gate_proj": (0, shared_inter), "up_proj": (shared_inter, shared_inter),
                        "down_proj": (0, hidden)}[s.group(1)]
        param = "gate_up_proj" if s.group(1) != "down_proj" else "down_proj"
        return Target(f"{prefix}.shared_expert.{param}.weight", offset, rows)
    if rest == "shared_expert_gate.weight" and unit.shared_expert_gate is not None:
        return Target(f"{prefix}.shared_expert_gate.weight", 0, 1)
    return None


__all__ = [
    "Experts",
    "GatedMLP",
    "MoEFFNUnit",
    "MoESpec",
    "Router",
    "moe_checkpoint_target",
    "moe_spec_from_config",
]
