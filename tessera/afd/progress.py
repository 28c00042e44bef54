"""Main-loop progress: how a stalled worker is told apart from a busy one.

A worker's heartbeat thread beats while its main loop computes (torch releases the GIL), so a
beat proves the process lives, not that its main loop moves: a deadlock or an endless loop
would beat on forever. So the main loop counts units of work it completes (``Progress.tick``:
a lane's layer or step end and an input handled on an attention worker, a batch answered on
an FFN worker) and says what it is doing (``state``); each heartbeat carries both. The front
(``ProgressWatch``) declares a worker stalled when its count stands still for
``failure_detect_s`` while it has work: its state is ``busy``, or it is ``idle`` although
the front has given it requests. An idle worker, and one ``waiting`` on a peer's transfer
(which fails at its own deadline, ``transfer_timeout_s``), is never stalled.

Test hook: the environment variable ``TESSERA_AFD_TEST_STALL=NAME:COUNT`` (e.g.
``ffn0.g0:20``) makes the worker of that name and generation block forever in its COUNT-th
tick, with its heartbeat going on. Tests set it to check stall detection; nothing else
reads it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

IDLE, BUSY, WAITING = "idle", "busy", "waiting"
STALL_ENV = "TESSERA_AFD_TEST_STALL"


def _stall_at(worker: str) -> int:
    name, _, count = os.environ.get(STALL_ENV, "").partition(":")
    return int(count) if name == worker and count.isdigit() else 0


class Progress:
    """A worker main loop's count of work done and its state, read by its heartbeat thread
    (plain attribute reads and writes: the GIL makes each one whole)."""

    def __init__(self, worker: str = "") -> None:
        self.count = 0
        self.state = IDLE
        self._stall_at = _stall_at(worker)

    def tick(self) -> None:
        """One more unit of work done."""
        self.count += 1
        if self.count == self._stall_at:
            threading.Event().wait()  # the test hook: stall here for good

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Blocked on a peer's transfer for the duration (bounded by its deadline)."""
        before, self.state = self.state, WAITING
        try:
            yield
        finally:
            self.state = before


class ProgressWatch:
    """The front's view of every worker's progress, from their heartbeats."""

    def __init__(self, names: list[str], detect_s: float, now_s: float) -> None:
        self.detect_s = detect_s
        self._count = dict.fromkeys(names, 0)
        self._state = dict.fromkeys(names, IDLE)
        self._since_s = dict.fromkeys(names, now_s)
        """Since when each worker has had work pending without progress."""

    def beat(self, name: str, count: int, state: str, has_requests: bool, now_s: float) -> None:
        """A heartbeat (``has_requests``: the front has requests on that worker). A new count
        is progress; a worker without work pending is not stalled either."""
        if count != self._count[name] or not _pending(state, has_requests):
            self._since_s[name] = now_s
        self._count[name] = count
        self._state[name] = state

    def progressed(self, name: str, now_s: float) -> None:
        """The worker showed progress otherwise (a step report), or is given work while
        the front thought it idle (its clock starts now)."""
        self._since_s[name] = now_s

    def stalled_s(self, name: str, has_requests: bool, now_s: float) -> float | None:
        """Seconds without progress while ``name`` had work pending, once over ``detect_s``;
        else None."""
        if not _pending(self._state[name], has_requests):
            self._since_s[name] = now_s
            return None
        stalled_s = now_s - self._since_s[name]
        return stalled_s if stalled_s > self.detect_s else None


def _pending(state: str, has_requests: bool) -> bool:
    """Whether a worker in ``state`` has work it should be making progress on."""
    return state == BUSY or (state == IDLE and has_requests)
