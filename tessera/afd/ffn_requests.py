"""What an FFN worker accepts: the bounds of a well-formed FFN request.

An FFN worker sizes its receive buffers from a request's header (``[src_rank, layer_id,
micro_batch, num_tokens, top_k]``, see ``dataplane.py``), so it checks every field against
the pool's configuration before allocating or receiving anything: a corrupt or forged header
must not make it allocate without bound, index past its shards, or crash. Expert ids are
checked too before they index the experts. The data plane itself is not authenticated (see
docs/security.md); these checks keep a bad message from taking the worker down with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RequestLimits:
    """The bounds of a request header in one pool (from the engine's limits)."""

    num_attention: int
    """Attention ranks are ``0..num_attention-1``: the only senders of requests."""
    micro_batches: int
    max_tokens: int
    """Rows of a layer request: at most a step's tokens (``max_num_batched_tokens``)."""
    max_head_rows: int
    """Rows of an LM head request: at most the sequences one step samples."""
    top_k: list[int]
    """Per layer id this worker serves: experts per token of a MoE layer, 0 for a dense
    layer. With a slice of the LM head the last entry is the head's (0)."""
    num_layers: int
    """Layer id ``num_layers`` is the LM head's request."""
    num_experts: int = 0

    def check(self, src: int, header: list[int]) -> str | None:
        """Why ``header``, received from rank ``src``, is malformed; None if it is not."""
        if len(header) != 5:
            return f"a header of {len(header)} fields"
        claimed_src, layer_id, micro_batch, num_tokens, top_k = header
        if not 0 <= src < self.num_attention or claimed_src != src:
            return f"a header from rank {src} claiming rank {claimed_src}"
        if not 0 <= layer_id < len(self.top_k):
            return f"layer {layer_id} out of range (0..{len(self.top_k) - 1})"
        if not 0 <= micro_batch < self.micro_batches:
            return f"micro-batch {micro_batch} out of range (0..{self.micro_batches - 1})"
        max_rows = self.max_head_rows if layer_id == self.num_layers else self.max_tokens
        if not 1 <= num_tokens <= max_rows:
            return f"{num_tokens} tokens for layer {layer_id} (at most {max_rows})"
        if top_k != self.top_k[layer_id]:
            return f"top_k {top_k} for layer {layer_id} (expected {self.top_k[layer_id]})"
        return None

    def check_expert_ids(self, topk_ids: torch.Tensor) -> str | None:
        """Why a MoE request's expert ids [T, k] are malformed; None if they are not."""
        if topk_ids.numel() and not (int(topk_ids.min()) >= 0 and
                                     int(topk_ids.max()) < self.num_experts):
            return f"expert ids outside 0..{self.num_experts - 1}"
        return None
