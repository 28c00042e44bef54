"""``GET /kv_events``: the prefix blocks a served engine's device cache holds, as a feed a
router in another process or host follows (``tessera router``).

The engine core sends its KV events (``tessera.kv.events``) with every step; the feed numbers
each batch and keeps the recent ones, and a mirror of every key held. A reader asks for what
changed since the sequence number it last saw and gets the batches after it merged into one;
a reader that is new, or further behind than the kept batches, gets the whole cache instead
(``cleared`` and every held key), so it never needs what was dropped.
"""

from __future__ import annotations

from collections import deque

from tessera.kv.events import KVEvents

MAX_KEPT_KEYS = 1 << 16
"""Keys in the kept batches, at most: more and the oldest batches go (readers that far behind
get the whole cache)."""


class KVFeed:
    """Numbered KV event batches of one engine (a new core starts with ``cleared``)."""

    def __init__(self) -> None:
        self.seq = 0
        self._held: set[int] = set()
        self._batches: deque[tuple[int, KVEvents]] = deque()
        self._num_kept_keys = 0

    def apply(self, events: KVEvents) -> None:
        if not (events.stored or events.removed or events.cleared):
            return
        if events.cleared:
            self._held.clear()
        self._held.difference_update(events.removed)
        self._held.update(events.stored)
        self.seq += 1
        self._batches.append((self.seq, events))
        self._num_kept_keys += len(events.stored) + len(events.removed)
        while self._num_kept_keys > MAX_KEPT_KEYS and len(self._batches) > 1:
            _, old = self._batches.popleft()
            self._num_kept_keys -= len(old.stored) + len(old.removed)

    def since(self, seq: int | None) -> tuple[int, KVEvents]:
        """(the current sequence number, the changes after batch ``seq``): the whole cache,
        marked ``cleared``, when ``seq`` is None, ahead of the feed (another core's), or
        older than the kept batches."""
        first = self._batches[0][0] if self._batches else self.seq + 1
        if seq is None or seq > self.seq or seq < first - 1:
            return self.seq, KVEvents(sorted(self._held), [], True)
        stored: dict[int, None] = {}
        removed: dict[int, None] = {}
        cleared = False
        for number, events in self._batches:
            if number <= seq:
                continue
            if events.cleared:
                stored.clear()
                removed.clear()
                cleared = True
            for key in events.removed:
                stored.pop(key, None)
                removed[key] = None
            for key in events.stored:
                removed.pop(key, None)
                stored[key] = None
        return self.seq, KVEvents(list(stored), list(removed), cleared)
