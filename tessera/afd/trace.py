"""Per-worker spans of compute and transfer, merged into one Chrome trace-event JSON file.

Each worker records complete events (``ph: "X"``) with wall-clock microseconds, so spans of
different processes on one host line up. Workers ship their spans to the front with their step
reports and heartbeats; the front writes the file (open it in chrome://tracing or Perfetto).
Categories: ``attn`` and ``ffn`` are compute, ``send`` is the time from issuing a micro-batch's
FFN request to its result being in hand, ``wait`` the part of that the attention worker spent
blocked. ``hidden_transfer_fraction`` is 1 - wait / send: the share of FFN round trips that
attention compute of the other micro-batches covered.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import msgspec


class Span(msgspec.Struct, frozen=True, array_like=True):
    name: str
    cat: str
    start_us: int
    dur_us: int
    args: dict[str, int] | None = None


class Tracer:
    """Collects spans in memory when enabled; ``take`` hands them over and forgets them."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._spans: list[Span] = []
        self._lock = threading.Lock()  # the heartbeat thread takes spans from another thread

    @staticmethod
    def now_us() -> int:
        return time.time_ns() // 1000

    def add(self, name: str, cat: str, start_us: int, end_us: int,
            args: dict[str, int] | None = None) -> None:
        if self.enabled:
            span = Span(name, cat, start_us, max(end_us - start_us, 0), args)
            with self._lock:
                self._spans.append(span)

    def take(self) -> list[Span]:
        with self._lock:
            spans, self._spans = self._spans, []
        return spans


def chrome_events(worker: str, pid: int, spans: Iterable[Span]) -> list[dict]:
    """Trace events of one worker; ``pid`` groups its rows in the viewer."""
    events: list[dict] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": worker}}
    ]
    for s in spans:
        tid = {"send": 1, "wait": 2}.get(s.cat, 0)  # transfers on their own rows
        events.append({"name": s.name, "cat": s.cat, "ph": "X", "ts": s.start_us,
                       "dur": s.dur_us, "pid": pid, "tid": tid, "args": s.args or {}})
    return events


def write_trace(path: str | Path, events: list[dict]) -> None:
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


def hidden_transfer_fraction(events: list[dict]) -> float | None:
    """1 - (time blocked on FFN results) / (time FFN round trips were in flight)."""
    sent = sum(e["dur"] for e in events if e.get("cat") == "send")
    waited = sum(e["dur"] for e in events if e.get("cat") == "wait")
    if sent <= 0:
        return None
    return max(0.0, 1.0 - waited / sent)
