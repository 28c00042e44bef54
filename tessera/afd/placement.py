"""Which FFN worker holds what: the one source of the FFN split, used by both sides.

Dense FFNs are split along the intermediate dimension (tensor parallel), MoE layers by expert
(expert parallel), both as contiguous, as-even-as-possible ranges over the F FFN workers. A MoE
layer's shared expert (if any) lives whole on FFN worker 0, so worker 0 sees every token of
such a layer; other workers see only tokens routed to their experts.
"""

from __future__ import annotations

import torch


def shard_range(size: int, num_shards: int, index: int) -> tuple[int, int]:
    """``[start, end)`` of shard ``index`` when ``size`` items are split as evenly as possible."""
    base, extra = divmod(size, num_shards)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def expert_ids_of(num_experts: int, num_ffn_workers: int, index: int) -> list[int]:
    """The routed experts FFN worker ``index`` holds."""
    return list(range(*shard_range(num_experts, num_ffn_workers, index)))


def expert_owners(num_experts: int, num_ffn_workers: int) -> torch.Tensor:
    """[E] int64: the FFN worker index holding each expert."""
    owners = torch.empty(num_experts, dtype=torch.int64)
    for f in range(num_ffn_workers):
        start, end = shard_range(num_experts, num_ffn_workers, f)
        owners[start:end] = f
    return owners
