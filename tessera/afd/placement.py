"""Which FFN worker holds what: the one source of the FFN split, used by both sides.

Dense FFNs are split along the intermediate dimension (tensor parallel), MoE layers by expert
(expert parallel), both as contiguous, as-even-as-possible ranges over the F FFN workers. A MoE
layer's shared expert (if any) lives whole on FFN worker 0, so worker 0 sees every token of
such a layer; other workers see only tokens routed to their experts. With
``AFDConfig.ffn_head_share`` > 0 the LM head is split by vocabulary rows: the attention worker
keeps the first rows, the FFN workers split the rest the same even way.
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


def head_split(vocab_size: int, ffn_share: float, num_ffn_workers: int) -> list[tuple[int, int]]:
    """``[start, end)`` vocabulary rows of the LM head: entry 0 for the attention worker, then
    one per FFN worker (empty ranges when the share is 0). Contiguous and in vocabulary order,
    so the logits are the slices side by side."""
    num_remote = round(ffn_share * vocab_size)
    local_end = vocab_size - num_remote
    ranges = [(0, local_end)]
    for f in range(num_ffn_workers):
        start, end = shard_range(num_remote, num_ffn_workers, f)
        ranges.append((local_end + start, local_end + end))
    return ranges
