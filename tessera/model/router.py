"""The MoE router: gate linear -> scores -> (group-limited) top-k -> expert ids and weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.model.moe_spec import MoESpec


class Router(nn.Module):
    """Picks ``top_k`` experts per token and their combine weights, for every family's rule.

    Scores and weights are computed in float32 whatever the model dtype, as the DeepSeek
    reference does; routing is a discrete choice, so it should not depend on bf16 rounding.
    After each call ``last_expert_counts`` ([num_experts] int64, on the device) holds how many
    tokens each expert received: the load signal an expert balancer reads.
    """

    def __init__(self, moe: MoESpec) -> None:
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, moe.hidden_size))
        # A parameter (not a buffer) so the loader's every-parameter-covered check includes it.
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(moe.num_experts), requires_grad=False)
            if moe.has_score_bias
            else None
        )
        self.last_expert_counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (topk_ids [T, k] int64, topk_weights [T, k] float32)."""
        moe = self.moe
        num_tokens = x.shape[0]
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.softmax(dim=-1) if moe.scoring == "softmax" else logits.sigmoid()
        choice = scores
        if self.e_score_correction_bias is not None:
            choice = scores + self.e_score_correction_bias.float()  # selection only
        if moe.num_groups > 1:
            choice = self._mask_groups(choice, num_tokens)
        topk_ids = choice.topk(moe.top_k, dim=-1).indices  # [T, k]
        topk_weights = scores.gather(1, topk_ids)  # [T, k], from the unbiased scores
        if moe.norm_topk_prob:
            # The epsilon only matters for all-zero sigmoid scores; it keeps them finite.
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        if moe.routed_scaling_factor != 1.0:
            topk_weights = topk_weights * moe.routed_scaling_factor
        self.last_expert_counts = torch.bincount(
            topk_ids.reshape(-1), minlength=moe.num_experts
        )
        return topk_ids, topk_weights

    def _mask_groups(self, choice: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Set the scores of experts outside each token's best ``topk_groups`` groups to -inf."""
        moe = self.moe
        grouped = choice.view(num_tokens, moe.num_groups, -1)  # [T, G, E/G]
        if moe.group_score == "top2_sum":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.amax(dim=-1)  # [T, G]
        best = group_scores.topk(moe.topk_groups, dim=-1).indices  # [T, topk_groups]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, -1)  # [T, E]
        return choice.masked_fill(~keep, float("-inf"))
