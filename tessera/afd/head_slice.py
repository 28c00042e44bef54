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


class RemovedHead(nn.Linear):
    """Stands in for an LM head whose rows now live in ``HeadSlice``s: the whole head is freed,
    and a call (which would need all of it) fails loudly instead of giving partial logits."""

    def __init__(self, head: nn.Linear) -> None:
        nn.Module.__init__(self)  # no weight of its own
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.register_parameter("bias", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this worker holds only a slice of the LM head (ffn_head_share)")
