"""The end of a tier's background writes, shared by the SSD and remote tiers.

Both queue saves for one writer thread: ``_pending`` holds the keys queued and not yet
written (guarded by ``_lock``), ``_queue`` feeds ``_writer``, and a ``None`` in the queue
stops it. How each writes a block is its own.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, ClassVar


class QueuedWrites:
    """``flush`` and ``stop_writer`` over the attributes above, which the tier sets."""

    close_timeout_s: ClassVar[float]
    """The longest ``flush`` waits by default, and ``stop_writer`` for the thread to end."""
    _lock: threading.Lock
    _pending: dict[int, int]
    _queue: queue.Queue[Any]
    _writer: threading.Thread

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write has landed or was dropped; False on timeout."""
        deadline = time.monotonic() + (self.close_timeout_s if timeout_s is None else timeout_s)
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.005)
        return False

    def stop_writer(self) -> None:
        """Finish queued writes (bounded wait) and stop the writer; safe to call twice."""
        if self._writer.is_alive():
            self.flush()
            self._queue.put(None)
            self._writer.join(timeout=self.close_timeout_s)
