"""The SSD KV tier: one file per block under a directory, with a byte budget and LRU
eviction. Pure Python (no torch).

Files live in ``DIR/<fingerprint>/<first 2 hex digits of key>/<key hex>.kvb``, so engines
with the same model and cache layout share them and a restarted engine finds them: the
index is rebuilt from the directory at start-up, oldest file first. Writes run on one
background thread from a bounded queue (a full queue drops the block rather than stall a
step) and land atomically (a temporary file renamed into place). Reads happen on the step
loop and check everything (``block_file.decode``); a refused file is deleted and its block
recomputed. A write that fails (disk full, read-only, removed directory) logs one warning and
the tier stops taking writes; reads go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from tessera.kv import block_file
from tessera.kv.keys import KEY_BYTES, key_hex
from tessera.kv.queued_writes import QueuedWrites
from tessera.kv.stats import TierCounters
from tessera.outputs import KVTierStats

logger = logging.getLogger(__name__)

SUFFIX = ".kvb"
DEFAULT_MAX_PENDING_BYTES = 256 << 20


def block_path(tier_dir: Path, key: int) -> Path:
    name = key_hex(key)
    return tier_dir / name[:2] / (name + SUFFIX)


def _key_of(path: Path) -> int | None:
    stem = path.name.removesuffix(SUFFIX)
    if len(stem) != 2 * KEY_BYTES or path.parent.name != stem[:2]:
        return None
    try:
        return int.from_bytes(bytes.fromhex(stem), "little")
    except ValueError:
        return None


class DiskTier(QueuedWrites):
    """Block files of one cache layout (``fingerprint``) under ``root``, within
    ``capacity_bytes``."""

    close_timeout_s = 30.0

    def __init__(self, root: str | Path, capacity_bytes: int, fingerprint: str,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"kv_offload_disk must be positive bytes, got {capacity_bytes}")
        self.dir = Path(root) / fingerprint
        self.fingerprint = fingerprint
        self.capacity_bytes = capacity_bytes
        self.max_pending_bytes = max_pending_bytes
        self.counters = TierCounters("disk", capacity_bytes)
        self._lock = threading.Lock()  # guards files, used_bytes, pending, writable
        self.files: OrderedDict[int, int] = OrderedDict()  # key -> file bytes, LRU first
        self.used_bytes = 0
        self._pending: dict[int, int] = {}  # key -> payload bytes queued for writing
        self._pending_bytes = 0
        self.writable = True
        self._queue: queue.Queue[tuple[int, int, list[int], Any] | None] = queue.Queue()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._scan()
        except OSError as e:
            self._stop_writes(e)
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk-writer",
                                        daemon=True)
        self._writer.start()

    def _scan(self) -> None:
        """Index the files a previous run left, oldest first; drop unfinished writes."""
        found: list[tuple[float, int, int]] = []
        for path in self.dir.glob("??/*"):
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                continue
            key = _key_of(path)
            if key is None:
                continue
            st = path.stat()
            found.append((st.st_mtime, key, st.st_size))
        for _, key, size in sorted(found):
            self.files[key] = size
            self.used_bytes += size
        self._evict_to(self.capacity_bytes)

    # ----------------------------------------------------------------- queries
    def __contains__(self, key: int) -> bool:
        """Whether the tier holds ``key``; a block another engine wrote into the same
        directory since this one started is found (and indexed) too."""
        if key in self.files:
            return True
        # Under the lock, so an eviction (which deletes under it) cannot slip between the
        # stat and the indexing and leave a key whose file is gone.
        with self._lock:
            if key in self.files:
                return True
            try:
                size = block_path(self.dir, key).stat().st_size
            except OSError:
                return False
            self.files[key] = size
            self.used_bytes += size
        return True

    def stats(self) -> KVTierStats:
        with self._lock:
            num_blocks, used, writable = len(self.files), self.used_bytes, self.writable
        return self.counters.snapshot(num_blocks, used, writable)

    # ----------------------------------------------------------------- reads
    def read(self, key: int, parent_key: int, token_ids: list[int]) -> memoryview | None:
        """The payload of this block (a writable buffer), or None when the tier does not hold
        it whole: a missing, truncated, corrupt or foreign file is deleted and counted."""
        if key not in self.files:
            return None
        path = block_path(self.dir, key)
        start = time.perf_counter()
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = bytearray(size)
                num_read = f.readinto(data)
            payload = block_file.decode(memoryview(data)[:num_read], self.fingerprint, key,
                                        parent_key, token_ids)
        except FileNotFoundError:
            # Evicted by another engine sharing the directory, or cleared: a plain miss.
            logger.debug("KV block %s vanished before it was read", path.name)
            self._forget(key, delete=False)
            with self.counters.lock:
                self.counters.num_failed_loads += 1
            return None
        except (OSError, block_file.BlockFileError) as e:
            logger.warning("KV block %s refused and recomputed: %s", path.name, e)
            self._forget(key, delete=True)
            with self.counters.lock:
                self.counters.num_failed_loads += 1
            return None
        with self._lock:
            if key in self.files:
                self.files.move_to_end(key)
        with self.counters.lock:
            self.counters.num_read_bytes += num_read
            self.counters.load_s.observe(time.perf_counter() - start)
        return payload

    # ----------------------------------------------------------------- writes
    def put(self, key: int, parent_key: int, token_ids: list[int], payload: Any) -> None:
        """Queue a block for writing; ``payload`` (a buffer of its bytes) must not change
        afterwards. Dropped, and counted, when the tier is not writable or too far behind."""
        nbytes = memoryview(payload).nbytes
        with self._lock:
            if key in self.files or key in self._pending:
                return
            if not self.writable or self._pending_bytes + nbytes > self.max_pending_bytes:
                with self.counters.lock:
                    self.counters.num_dropped_saves += 1
                return
            self._pending[key] = nbytes
            self._pending_bytes += nbytes
        self._queue.put((key, parent_key, list(token_ids), payload))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            key, parent_key, token_ids, payload = item
            try:
                if self.writable:
                    self._write(key, parent_key, token_ids, payload)
            except OSError as e:
                self._stop_writes(e)
            except Exception:  # never let the writer die silently
                logger.exception("KV disk tier: writing a block failed")
            finally:
                with self._lock:
                    self._pending_bytes -= self._pending.pop(key, 0)

    def _write(self, key: int, parent_key: int, token_ids: list[int], payload: Any) -> None:
        start = time.perf_counter()
        view = memoryview(payload).cast("B")
        header = block_file.encode_header(self.fingerprint, key, parent_key, token_ids, view)
        size = len(header) + view.nbytes
        if size > self.capacity_bytes:
            return
        with self._lock:
            self._evict_to(self.capacity_bytes - size)
        path = block_path(self.dir, key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with tmp.open("wb") as f:
                f.write(header)
                f.write(view)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            # A lookup may have indexed the file between the rename and here (``__contains__``
            # finds files other engines write): count it once.
            if key not in self.files:
                self.files[key] = size
                self.used_bytes += size
        with self.counters.lock:
            self.counters.num_written_bytes += size
            self.counters.save_s.observe(time.perf_counter() - start)

    def _evict_to(self, max_bytes: int) -> None:
        """Delete least recently used files until at most ``max_bytes`` are used (holds
        ``_lock``)."""
        while self.files and self.used_bytes > max_bytes:
            key, size = self.files.popitem(last=False)
            self.used_bytes -= size
            block_path(self.dir, key).unlink(missing_ok=True)
            with self.counters.lock:
                self.counters.num_evicted_blocks += 1

    def _forget(self, key: int, delete: bool) -> None:
        with self._lock:
            size = self.files.pop(key, None)
            if size is not None:
                self.used_bytes -= size
        if delete:
            with contextlib.suppress(OSError):
                block_path(self.dir, key).unlink(missing_ok=True)

    def _stop_writes(self, error: OSError) -> None:
        with self._lock:
            if not self.writable:
                return
            self.writable = False
        logger.warning("KV disk tier at %s stops taking writes (%s); serving continues, "
                       "reading the blocks it holds", self.dir, error)

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Finish queued writes (bounded wait) and stop the writer; safe to call twice."""
        self.stop_writer()
