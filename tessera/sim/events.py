"""Discrete-event loop: a time-ordered heap of events whose handlers return new events."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Handler = Callable[[float, Any], Iterable["Event"]]


@dataclass(frozen=True)
class Event:
    """Something that happens at ``time_s``; ties run in insertion order (``seq``)."""

    time_s: float
    seq: int
    handler: Handler
    payload: Any = None


class EventLoop:
    """Runs events in time order until none are left (or a time/event limit is hit)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Event]] = []
        self._seq = 0
        self.now_s = 0.0
        self.num_processed = 0

    def schedule(self, time_s: float, handler: Handler, payload: Any = None) -> Event:
        """Add an event; times earlier than now are clamped to now (causality)."""
        event = self.make(time_s, handler, payload)
        heapq.heappush(self._heap, (event.time_s, event.seq, event))
        return event

    def push(self, events: Iterable[Event]) -> None:
        """Add already-built events (as returned by handlers)."""
        for event in events:
            heapq.heappush(self._heap, (event.time_s, event.seq, event))

    def make(self, time_s: float, handler: Handler, payload: Any = None) -> Event:
        """Build an event for a handler to return (not yet scheduled)."""
        event = Event(max(time_s, self.now_s), self._seq, handler, payload)
        self._seq += 1
        return event

    def run(self, max_events: int | None = None) -> None:
        """Process events in order; each handler's returned events are scheduled."""
        while self._heap:
            if max_events is not None and self.num_processed >= max_events:
                break
            event = heapq.heappop(self._heap)[2]
            self.now_s = event.time_s
            self.num_processed += 1
            self.push(event.handler(event.time_s, event.payload))

    def __len__(self) -> int:
        return len(self._heap)
