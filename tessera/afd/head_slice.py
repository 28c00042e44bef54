"""A slice of the LM head's vocabulary rows, for splitting the head across the two pools.

With ``AFDConfig.ffn_head_share`` > 0 the attention worker computes the logits of the first
vocabulary rows and each FFN worker those of its own range (``placement.head_split``); the
attention worker puts the slices side by side in vocabulary order. Each output element is the
same dot product over the hidden size as in the whole head, so greedy tokens do not change.
"""

from __future__ import annotations

import torch
from torch import nn


class HeadSlice(nn.Module):
    """Rows ``[start, end)`` of an LM head: final-normed rows [S, D] -> logits [S, end - start]."""

    def __init__(self, lm_head: nn.Linear, start: int, end: int) -> None:
        super().__init__()
        # A plain linear over a copy of the slice: ``pack_linears`` then gives it the engine's
        # packed kernel, and the caller may free the whole head.
        self.lm_head = nn.Linear(lm_head.in_features, end - start, bias=False)
        self.lm_head.weight = nn.Parameter(
            lm_head.weight.detach()[start:end].clone(), requires_grad=False
        )

    def forward(self, normed: torch.Tensor, topk_ids: torch.Tensor | None = None,
                topk_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Called like an FFN shard (the routing arguments are unused)."""
        return self.lm_head(normed)  # [S, end - start], the model's dtype
