"""A host KV store (``tessera.kv.store``) started and owned by an engine front, so the engines
it launches on this host share one host tier without the user starting a store by hand.

The store outlives the engines it serves: a Transformerless pool that fails and is restarted
finds the host tier warm. A store that exits is started again at the same address (engines
reattach by themselves, see ``shared_host_tier.py``); it ends with its owner, also when the
owner is killed (the store checks its parent, as workers do).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
"""A store is a small Python process; a loaded host can still take long to start one."""
RESTART_INTERVAL_S = 5.0
"""At most one restart per interval: a store that dies at once does not spin its owner."""

_live: weakref.WeakSet[StoreProcess] = weakref.WeakSet()


class StoreStartError(RuntimeError):
    """The store process did not start; the message says why."""


class StoreProcess:
    """A ``tessera kv store`` child listening on ``address`` (``ipc://PATH``) with
    ``capacity_bytes`` of shared memory."""

    def __init__(self, address: str, capacity_bytes: int,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        if not address.startswith("ipc://"):
            raise ValueError(f"the KV store listens on ipc://PATH, got {address!r}")
        self.address = address
        self.capacity_bytes = capacity_bytes
        self.num_restarts = 0
        self._dir = tempfile.mkdtemp(prefix="tessera-kvstore-")
        self._ready = Path(self._dir) / "ready"
        self._proc = self._spawn()
        self._started_s = time.monotonic()
        _live.add(self)
        deadline = time.monotonic() + start_timeout_s
        while not self._ready.exists():
            code = self._proc.poll()
            if code is not None or time.monotonic() > deadline:
                self.close()
                raise StoreStartError(
                    f"the host KV store at {address} exited with code {code} while starting"
                    if code is not None else
                    f"the host KV store at {address} did not start within {start_timeout_s:g} s")
            time.sleep(0.05)

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._ready.unlink(missing_ok=True)
        return subprocess.Popen(
            [sys.executable, "-m", "tessera.kv.store", "--address", self.address,
             "--memory", str(self.capacity_bytes), "--ready-file", str(self._ready),
             "--parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL, start_new_session=True)

    @classmethod
    def in_dir(cls, ipc_dir: str, capacity_bytes: int) -> StoreProcess:
        """A store listening in the owner's private directory of ipc sockets."""
        return cls(f"ipc://{ipc_dir}/kv-store", capacity_bytes)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def check(self) -> None:
        """Start the store again if it has exited (without waiting for it: engines find it
        when it is up). Cheap enough to call every step."""
        if self._proc.poll() is None:
            return
        now = time.monotonic()
        if now - self._started_s < RESTART_INTERVAL_S:
            return
        logger.warning("the host KV store exited (code %s); starting it again",
                       self._proc.returncode)
        self._proc = self._spawn()
        self._started_s = now
        self.num_restarts += 1

    def close(self) -> None:
        """Stop the store (its arena and socket are removed by it); safe to call twice."""
        _live.discard(self)
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        with contextlib.suppress(OSError):
            self._ready.unlink(missing_ok=True)
            Path(self._dir).rmdir()


@atexit.register
def _close_live_stores() -> None:
    for store in list(_live):
        store.close()
