"""The KV connector interface: how an engine moves KV blocks between its device pool and
storage outside it (host memory, SSD, another engine). Pure Python (no torch).

One connector per engine, with two sides:

- the **scheduler side** answers, while the scheduler admits a request, how many blocks after
  its device prefix hits can be loaded from outside (``num_loadable_blocks``), and is told
  what the scheduler committed to (``commit_lookup``);
- the **worker side** owns the copies: ``load`` fills freshly allocated device blocks before
  the step that reads them runs, and ``save`` takes blocks that became full of computed KV
  after a step, before they can be freed or reused.

Invariants the engine keeps: a load names blocks the scheduler allocated for this step and
that no other sequence can read (they are not yet in the device prefix cache); a block that
fails to load is recomputed, never read (the scheduler rolls the sequence back to its first
failed block, ``Scheduler.drop_failed_loads``); a save names blocks that stay allocated until
``save`` returns, so a connector that copies synchronously needs no delayed free.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class BlockLoad:
    """Fill ``block_ids`` (device blocks) with the KV of the blocks named ``keys``.

    ``token_ids[i]`` are the tokens block i holds and ``parent_key`` the key of the block
    before the first one, so a tier can check what it returns against more than the key.
    """

    keys: list[int]
    block_ids: list[int]
    token_ids: list[list[int]]
    parent_key: int


@dataclass(frozen=True)
class BlockSave:
    """Keep the KV of device block ``block_id``, a full block named ``key``."""

    key: int
    block_id: int
    token_ids: list[int]
    parent_key: int


@dataclass
class LoadResult:
    """Per ``BlockLoad`` of a step, how many leading blocks now hold valid KV."""

    num_loaded_blocks: list[int] = field(default_factory=list)

    def failed(self, loads: list[BlockLoad]) -> bool:
        return any(n < len(load.keys)
                   for n, load in zip(self.num_loaded_blocks, loads, strict=True))


class KVConnectorScheduler(Protocol):
    """The scheduler's view: lookups, no copies."""

    def num_loadable_blocks(self, keys: Iterable[int]) -> int:
        """How many leading blocks of ``keys`` can be loaded from outside the device pool.
        ``keys`` may be lazy: stop consuming it at the first miss."""
        ...

    def commit_lookup(self, keys: list[int], num_loading_blocks: int) -> None:
        """The scheduler admitted a request that looked up ``keys`` (the blocks after its
        device hits) and will load the first ``num_loading_blocks`` of them (counters)."""
        ...


class KVConnectorWorker(Protocol):
    """The copies, run by the engine's step loop around the model."""

    def load(self, loads: list[BlockLoad]) -> LoadResult:
        """Fill the device blocks of ``loads``; never raises: a block that cannot be loaded
        (missing, corrupt, foreign) ends its load, reported in the result."""
        ...

    def save(self, saves: list[BlockSave]) -> None:
        """Copy these full device blocks out before they can be reused; never raises (a tier
        that cannot take them drops them and says so in its stats)."""
        ...

    def close(self) -> None:
        """Finish or drop in-flight writes and release the tiers; safe to call twice."""
        ...


class KVConnector(KVConnectorScheduler, KVConnectorWorker, Protocol):
    """Both sides, for a connector living in the engine's process."""
