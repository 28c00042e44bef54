"""Which prefix blocks an engine's device pool holds, as events a router can follow. Pure
Python (no torch).

An engine publishes a block's prefix key when the block becomes full of computed KV and
enters the prefix cache (``stored``), and withdraws it when the block is evicted for reuse
or the cache is reset (``removed``, ``cleared``). A router replaying the events of every
engine knows, block for block, where each prefix is cached (``tessera.cluster.kv_index``).
"""

from __future__ import annotations

import msgspec

_EVENT_KEY_MASK = (1 << 64) - 1


def event_key(key: int) -> int:
    """The 64 low bits of a prefix key, as events carry it (msgpack's widest integer). A
    router only places requests with it: a collision costs a worse placement, never a wrong
    block, since engines look blocks up by the full key."""
    return key & _EVENT_KEY_MASK


class KVEvents(msgspec.Struct, frozen=True, array_like=True):
    """The changes since the previous batch, applied in this order: ``cleared`` (forget all
    this engine published before), ``removed``, ``stored``. No key is in both lists."""

    stored: list[int] = []
    removed: list[int] = []
    cleared: bool = False


class KVEventLog:
    """Collects a block manager's events until ``take``. Each key is in one list at most,
    the one of its latest event, so a batch holds at most one entry per key seen."""

    def __init__(self, cached_keys: list[int]) -> None:
        # The first batch states the whole cache: a reader may have missed everything before.
        self._stored: dict[int, None] = dict.fromkeys(map(event_key, cached_keys))
        self._removed: dict[int, None] = {}
        self._cleared = True

    def stored(self, key: int) -> None:
        key = event_key(key)
        self._removed.pop(key, None)
        self._stored[key] = None

    def removed(self, key: int) -> None:
        # Listed even if stored since the last take: the reader may have known it from
        # before (evicted, stored, evicted), and removing an unknown key is harmless.
        key = event_key(key)
        self._stored.pop(key, None)
        self._removed[key] = None

    def cleared(self) -> None:
        self._stored.clear()
        self._removed.clear()
        self._cleared = True

    def take(self) -> KVEvents:
        events = KVEvents(list(self._stored), list(self._removed), self._cleared)
        self._stored, self._removed, self._cleared = {}, {}, False
        return events
