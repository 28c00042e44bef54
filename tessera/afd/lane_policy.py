"""Which lane a new request joins: the one policy both the attention worker's lanes
(``tessera.afd.lanes``) and the simulator's model of them follow. Pure Python (no torch)."""

from __future__ import annotations

from collections.abc import Sequence


def pick_lane(num_unfinished: Sequence[int]) -> int:
    """The lane with the fewest unfinished sequences; the lowest index among equals, so an
    idle worker fills its lanes in order."""
    if not num_unfinished:
        raise ValueError("no lanes to pick from")
    return min(range(len(num_unfinished)), key=lambda i: (num_unfinished[i], i))
