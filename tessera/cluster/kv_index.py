"""Where each prefix block is cached, across the instances of a cluster. Pure Python.

Built from the instances' KV events (``tessera.kv.events``), and from what the router sent
each instance and expects it to cache (``expect``): those keys count until an event confirms
or withdraws them, or until their deadline. An instance that fails or restarts is forgotten
at once.
"""

from __future__ import annotations

from tessera.kv.events import KVEvents


class KVIndex:
    """Prefix keys (``event_key`` form) per instance; lookups are O(blocks x instances)."""

    def __init__(self, num_instances: int) -> None:
        self._keys: list[set[int]] = [set() for _ in range(num_instances)]
        self._expected: list[dict[int, float]] = [{} for _ in range(num_instances)]

    def apply(self, instance: int, events: KVEvents) -> None:
        keys, expected = self._keys[instance], self._expected[instance]
        if events.cleared:
            keys.clear()
        keys.difference_update(events.removed)
        keys.update(events.stored)
        for key in events.removed:
            expected.pop(key, None)
        for key in events.stored:
            expected.pop(key, None)

    def expect(self, instance: int, keys: list[int], now_s: float, until_s: float) -> None:
        """``instance`` was sent a prompt with these keys at ``now_s``: count them as held
        until ``until_s`` unless its events say otherwise first."""
        expected, held = self._expected[instance], self._keys[instance]
        for key in keys:
            if key not in held:
                expected[key] = until_s
        if len(expected) > 4 * len(held) + 65536:  # bound what never got confirmed
            self._expected[instance] = {k: t for k, t in expected.items() if t >= now_s}

    def forget(self, instance: int) -> None:
        """The instance is gone (failed, restarted): none of its blocks count."""
        self._keys[instance].clear()
        self._expected[instance].clear()

    def num_blocks(self, instance: int) -> int:
        return len(self._keys[instance])

    def overlap(self, instance: int, keys: list[int], now_s: float = 0.0) -> int:
        """How many leading blocks of a prompt with prefix keys ``keys`` the instance holds or
        is expected to by ``now_s`` (a block counts only after all before it: a cache hit is
        a prefix). Expectations past their deadline are dropped on the way."""
        held, expected = self._keys[instance], self._expected[instance]
        n = 0
        for key in keys:
            if key not in held:
                until_s = expected.get(key)
                if until_s is None:
                    break
                if until_s < now_s:
                    del expected[key]
                    break
            n += 1
        return n
