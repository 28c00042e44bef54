"""The host-memory KV tier: a fixed arena of block slots with LRU eviction.

The arena is allocated once (pinned on CUDA, so copies to and from the device can run
asynchronously), and a slot holds one block of every layer, laid out as the block file's
payload. Each slot remembers the key, parent key and tokens it holds, and ``get`` compares
them, so a slot is never returned for a prefix it does not hold.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from tessera.kv.keys import Block
from tessera.kv.stats import TierCounters
from tessera.outputs import KVTierStats

CopyFn = Callable[[int, torch.Tensor], object]
"""Called with (index of the block in the batch, its host buffer [block_bytes] uint8)."""


class HostTier:
    """``capacity_bytes // block_bytes`` slots; every method is O(1) per block."""

    def __init__(self, capacity_bytes: int, block_bytes: int, pin_memory: bool = False) -> None:
        self.num_slots = capacity_bytes // block_bytes
        if self.num_slots < 1:
            raise ValueError(
                f"kv_offload_memory of {capacity_bytes} bytes holds no KV block "
                f"({block_bytes} bytes each)")
        self.block_bytes = block_bytes
        self.arena = torch.empty((self.num_slots, block_bytes), dtype=torch.uint8,
                                 pin_memory=pin_memory)  # [slots, block bytes]
        # key -> slot, least recently used first.
        self.slots: OrderedDict[int, int] = OrderedDict()
        self.holds: list[tuple[int, list[int]] | None] = [None] * self.num_slots
        """Per slot: (parent key, token ids) of the block it holds."""
        self.free_slots = list(range(self.num_slots - 1, -1, -1))
        self.counters = TierCounters("host", self.num_slots * block_bytes)

    def __contains__(self, key: int) -> bool:
        return key in self.slots

    def get(self, key: int, parent_key: int, token_ids: list[int]) -> torch.Tensor | None:
        """The slot [block_bytes] holding this block (now most recently used), or None."""
        slot = self.slots.get(key)
        if slot is None or self.holds[slot] != (parent_key, token_ids):
            return None
        self.slots.move_to_end(key)
        return self.arena[slot]

    def put(self, key: int, parent_key: int, token_ids: list[int]) -> torch.Tensor:
        """A slot [block_bytes] for this block, evicting the least recently used one if
        the arena is full; the caller fills it before anything else reads the tier."""
        slot = self.slots.get(key)
        if slot is None:
            if self.free_slots:
                slot = self.free_slots.pop()
            else:
                _, slot = self.slots.popitem(last=False)
                with self.counters.lock:
                    self.counters.num_evicted_blocks += 1
            self.slots[key] = slot
        self.slots.move_to_end(key)
        self.holds[slot] = (parent_key, list(token_ids))
        return self.arena[slot]

    # The batch interface ``tiered.TieredKVConnector`` uses (shared with ``SharedHostTier``).
    def num_leading(self, keys: list[int]) -> int:
        """How many leading ``keys`` the tier holds."""
        n = 0
        for key in keys:
            if key not in self.slots:
                break
            n += 1
        return n

    def load(self, blocks: list[Block], copy: CopyFn) -> int:
        """``copy`` the leading blocks the tier holds out of it; how many it copied."""
        n = 0
        for j, b in enumerate(blocks):
            start = time.perf_counter()
            slot = self.get(b.key, b.parent_key, b.token_ids)
            if slot is None:
                break
            copy(j, slot)
            with self.counters.lock:
                self.counters.load_s.observe(time.perf_counter() - start)
            n += 1
        return n

    def store(self, blocks: list[Block], fill: CopyFn) -> None:
        """Store the blocks the tier lacks, ``fill``-ing each one's slot."""
        for j, b in enumerate(blocks):
            if b.key in self.slots:
                self.slots.move_to_end(b.key)
                continue
            start = time.perf_counter()
            fill(j, self.put(b.key, b.parent_key, b.token_ids))
            with self.counters.lock:
                self.counters.num_written_bytes += self.block_bytes
                self.counters.save_s.observe(time.perf_counter() - start)

    def close(self) -> None:
        """Nothing to release but memory."""

    def clear(self) -> None:
        self.slots.clear()
        self.holds = [None] * self.num_slots
        self.free_slots = list(range(self.num_slots - 1, -1, -1))

    def stats(self) -> KVTierStats:
        return self.counters.snapshot(len(self.slots), len(self.slots) * self.block_bytes)
