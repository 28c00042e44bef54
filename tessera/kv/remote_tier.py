"""The remote KV tier: blocks in a Redis-protocol store (Valkey or Redis) that the engines of
every host reach over TCP. Pure Python (no torch).

A value is a block file (``block_file``: magic, header with the layout fingerprint, key,
parent key, token ids and CRC-32, then the payload) under ``tessera:kv:<fingerprint>:<key>``.
Engines of one model and cache layout share blocks; others never meet; and a value that is
not exactly the block asked for (corrupt, truncated, foreign, planted by another client of
the store) is refused and its block recomputed. The recomputed block is saved again, which
overwrites the bad value.

- Reads are batched: one pipelined round trip per load, each value cut by the server at
  ``block_bytes + MAX_HEADER_BYTES`` (GETRANGE), so a hostile value cannot make the engine
  read more than a block's worth.
- Writes are asynchronous: a background thread sends queued blocks in pipelines; a full queue
  (``max_pending_bytes``) drops the block and counts it, the step loop never waits on writes.
- Every call has a deadline (``TIMEOUT_S``). A call that fails or misses it turns the tier
  off at once: lookups find nothing, saves are dropped, the engine recomputes; one warning
  per outage. The writer thread probes the store at growing intervals (``RETRY_S`` up to
  ``MAX_RETRY_S``, each probe at most ``PROBE_TIMEOUT_S``) and turns the tier back on when it
  answers, without restarting the engine.
- Eviction is the store's (docs/kv_tiers.md: ``maxmemory`` with ``allkeys-lru``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tessera.kv import block_file
from tessera.kv.keys import Block, key_hex
from tessera.kv.queued_writes import QueuedWrites
from tessera.kv.stats import TierCounters
from tessera.kv.store_url import parse_store_url, redact
from tessera.outputs import KVTierStats

logger = logging.getLogger(__name__)

TIMEOUT_S = 2.0
"""Deadline of every call to the store. A healthy store answers a batch of blocks within
milliseconds (docs/kv_tiers.md, "Remote tier"); 2 s is far above that and bounds what an
outage costs the step loop: one such wait, after which the tier is off until a probe finds
the store again. The host store's deadline, for the same reason."""
PROBE_TIMEOUT_S = 0.25
RETRY_S = 5.0
MAX_RETRY_S = 30.0
DEFAULT_MAX_PENDING_BYTES = 256 << 20
MAX_HEADER_BYTES = 64 << 10
"""A header is a few hundred bytes (a block's token ids); this is room for any block size."""
MAX_BATCH_BYTES = 64 << 20
"""Most value bytes asked of the store in one round trip (loads and writes)."""
PASSWORD_ENV = "TESSERA_KV_STORE_PASSWORD"
"""The store's password when the URL has none."""
_FIRST_LOOKUP_KEYS = 8
_IDLE_WAKE_S = 0.5
_FAILURES = (redis.RedisError, OSError)


class RemoteTier(QueuedWrites):
    """Blocks of one cache layout (``fingerprint``) in the store at ``url``."""

    close_timeout_s = 10.0

    def __init__(self, url: str, fingerprint: str, block_bytes: int,
                 timeout_s: float | None = None,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES) -> None:
        """``timeout_s``: the deadline of every call (default ``TIMEOUT_S``)."""
        parse_store_url(url)  # the config checked it; a direct caller gets the same message
        self.url = redact(url)
        self.fingerprint = fingerprint
        self.block_bytes = block_bytes
        self.max_value_bytes = block_bytes + MAX_HEADER_BYTES
        self.max_pending_bytes = max_pending_bytes
        self.counters = TierCounters("remote", 0)
        self._prefix = f"tessera:kv:{fingerprint}:"
        # No retries inside the client: redis-py's default retries a failed call with
        # backoff, which turns a 2 s deadline into tens of seconds (measured, docs).
        self._client = self._connect(url, TIMEOUT_S if timeout_s is None else timeout_s)
        self._probe = self._connect(url, PROBE_TIMEOUT_S)
        self._lock = threading.Lock()  # guards the state below and the pending queue
        self._up = False
        self._down_reason: str | None = None
        self._retry_s = RETRY_S
        self._retry_at = 0.0
        self._checked_policy = False
        self._pending: dict[int, int] = {}  # key -> payload bytes queued for writing
        self._pending_bytes = 0
        self._queue: queue.Queue[tuple[Block, Any] | None] = queue.Queue()
        self._attach(self._client, probing=False)
        self._writer = threading.Thread(target=self._write_loop, name="kv-remote-writer",
                                        daemon=True)
        self._writer.start()

    @staticmethod
    def _connect(url: str, timeout_s: float) -> redis.Redis:
        # A password in the environment rather than the URL stays out of command lines (the
        # config travels to Transformerless workers as an argument).
        in_url = parse_store_url(url).has_credentials
        password = None if in_url else os.environ.get(PASSWORD_ENV)
        return redis.Redis.from_url(url, socket_timeout=timeout_s,
                                    socket_connect_timeout=timeout_s,
                                    retry=Retry(NoBackoff(), 0), password=password or None)

    def _name(self, key: int) -> str:
        return self._prefix + key_hex(key)

    # ----------------------------------------------------------------- connection
    @property
    def attached(self) -> bool:
        """Whether the tier is in use (the store answered the last call)."""
        return self._up

    def _attach(self, client: redis.Redis, probing: bool) -> bool:
        try:
            client.ping()
        except _FAILURES as e:
            self._down(f"does not answer ({_why(e)})", probing)
            return False
        back = self._down_reason is not None
        if back:  # connections to the store that went away are dead (nothing uses them now)
            self._client.connection_pool.disconnect()
        with self._lock:
            self._up, self._down_reason, self._retry_s = True, None, RETRY_S
        if back:
            logger.warning("KV store at %s is back; the remote tier is in use again", self.url)
        if not self._checked_policy:
            self._checked_policy = True
            self._warn_if_it_never_evicts()
        return True

    def _warn_if_it_never_evicts(self) -> None:
        try:
            policy = self._client.config_get("maxmemory-policy").get("maxmemory-policy")
        except _FAILURES:  # CONFIG is often disabled on managed stores: nothing to say
            return
        if policy == "noeviction":
            logger.warning("KV store at %s evicts nothing (maxmemory-policy noeviction): once "
                           "full it refuses new blocks; allkeys-lru makes it a cache", self.url)

    def _down(self, reason: str, probing: bool = False) -> None:
        with self._lock:
            first = self._up or self._down_reason is None
            self._up = False
            if first:
                self._down_reason, self._retry_s = reason, RETRY_S
            elif probing:
                self._retry_s = min(2 * self._retry_s, MAX_RETRY_S)
            self._retry_at = time.monotonic() + self._retry_s
        if first:
            logger.warning("KV store at %s %s; running without the remote tier until it "
                           "answers", self.url, reason)

    # ----------------------------------------------------------------- reads (step loop)
    def num_leading(self, keys: list[int]) -> int:
        """How many leading ``keys`` the store holds. Asks for the first few, then for four
        times as many while all were there: a prompt the store lacks costs one short round
        trip, not one naming all its blocks (hundreds for a long prompt)."""
        n = 0
        chunk = _FIRST_LOOKUP_KEYS
        while n < len(keys) and self._up:
            pipe = self._client.pipeline(transaction=False)
            for key in keys[n : n + chunk]:
                pipe.exists(self._name(key))
            try:
                found = pipe.execute()
            except _FAILURES as e:
                self._down(f"failed ({_why(e)})")
                return 0
            for hit in found:
                if not hit:
                    return n
                n += 1
            chunk *= 4
        return n

    def read(self, blocks: list[Block]) -> list[bytearray]:
        """The payloads of the leading ``blocks`` the store holds whole (writable buffers);
        a missing, oversized, corrupt or foreign value ends the list and is counted."""
        payloads: list[bytearray] = []
        for chunk in _chunks(blocks, max(1, MAX_BATCH_BYTES // self.max_value_bytes)):
            if not self._up:
                break
            start = time.perf_counter()
            pipe = self._client.pipeline(transaction=False)
            for b in chunk:
                # GETRANGE's end is inclusive: a value longer than any block comes back
                # one byte too long, and is refused without reading the rest.
                pipe.getrange(self._name(b.key), 0, self.max_value_bytes)
            try:
                # A command's own error (a name holding another type) is a bad value, not
                # an outage: it comes back in place of the value.
                values = pipe.execute(raise_on_error=False)
            except _FAILURES as e:
                self._down(f"failed ({_why(e)})")
                break
            per_block_s = (time.perf_counter() - start) / len(chunk)
            for b, value in zip(chunk, values, strict=True):
                payload = self._check(b, value)
                if payload is None:
                    return payloads
                payloads.append(payload)
                with self.counters.lock:
                    self.counters.num_read_bytes += len(value)
                    self.counters.load_s.observe(per_block_s)
        return payloads

    def _check(self, b: Block, value: bytes | Exception) -> bytearray | None:
        """The payload of ``value`` if it is block ``b`` whole; else None, counted."""
        why = None
        if isinstance(value, Exception):
            why = f"unreadable ({value})"
        elif not value:  # evicted (or never there) since the lookup: a miss
            logger.debug("KV block %s left the store before it was read", key_hex(b.key))
        elif len(value) > self.max_value_bytes:
            why = "larger than any block of this layout"
        else:
            try:
                payload = block_file.decode(value, self.fingerprint, b.key, b.parent_key,
                                            b.token_ids)
            except block_file.BlockFileError as e:
                why = str(e)
            else:
                if len(payload) == self.block_bytes:
                    return bytearray(payload)
                why = f"payload is {len(payload)} bytes, a block is {self.block_bytes}"
        if why is not None:
            logger.warning("KV block %s from the store refused and recomputed: %s",
                           key_hex(b.key), why)
        with self.counters.lock:
            self.counters.num_failed_loads += 1
        return None

    # ----------------------------------------------------------------- writes
    def put(self, block: Block, payload: Any) -> None:
        """Queue a block for writing; ``payload`` (a buffer of its bytes) must not change
        afterwards. Dropped, and counted, while the store is off or the queue is full."""
        nbytes = memoryview(payload).nbytes
        with self._lock:
            if block.key in self._pending:
                return
            if not self._up or self._pending_bytes + nbytes > self.max_pending_bytes:
                with self.counters.lock:
                    self.counters.num_dropped_saves += 1
                return
            self._pending[block.key] = nbytes
            self._pending_bytes += nbytes
        self._queue.put((block, payload))

    def _write_loop(self) -> None:
        while True:
            wait_s = _IDLE_WAKE_S if self._up else min(
                _IDLE_WAKE_S, max(0.0, self._retry_at - time.monotonic()))
            try:
                item = self._queue.get(timeout=max(wait_s, 0.001))
            except queue.Empty:
                if not self._up and time.monotonic() >= self._retry_at:
                    self._attach(self._probe, probing=True)
                continue
            if item is None:
                return
            batch = [item]
            num_bytes = memoryview(item[1]).nbytes
            while num_bytes < MAX_BATCH_BYTES:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # close: finish this batch, then stop
                    self._queue.put(None)
                    break
                batch.append(more)
                num_bytes += memoryview(more[1]).nbytes
            try:
                self._write(batch)
            except Exception:  # never let the writer die silently
                logger.exception("KV remote tier: writing blocks failed")
            finally:
                with self._lock:
                    for block, _ in batch:
                        self._pending_bytes -= self._pending.pop(block.key, 0)

    def _write(self, batch: list[tuple[Block, Any]]) -> None:
        if not self._up:
            with self.counters.lock:
                self.counters.num_dropped_saves += len(batch)
            return
        start = time.perf_counter()
        pipe = self._client.pipeline(transaction=False)
        sizes = []
        for block, payload in batch:
            view = memoryview(payload).cast("B")
            header = block_file.encode_header(self.fingerprint, block.key, block.parent_key,
                                              block.token_ids, view)
            value = b"".join((header, view))  # one copy
            sizes.append(len(value))
            pipe.set(self._name(block.key), value)
        try:
            results = pipe.execute(raise_on_error=False)
        except _FAILURES as e:
            self._down(f"failed ({_why(e)})")
            with self.counters.lock:
                self.counters.num_dropped_saves += len(batch)
            return
        per_block_s = (time.perf_counter() - start) / len(batch)
        refused = [r for r in results if isinstance(r, Exception)]
        if refused:  # e.g. OOM under noeviction: the store is up but takes no more
            logger.debug("KV store at %s refused %d blocks: %s", self.url, len(refused),
                         refused[0])
        with self.counters.lock:
            self.counters.num_dropped_saves += len(refused)
            for size, result in zip(sizes, results, strict=True):
                if not isinstance(result, Exception):
                    self.counters.num_written_bytes += size
                    self.counters.save_s.observe(per_block_s)

    # ----------------------------------------------------------------- stats, lifecycle
    def stats(self) -> KVTierStats:
        # The store's size and eviction are its own (shared by every engine): not counted here.
        return self.counters.snapshot(0, 0, writable=self._up)

    def close(self) -> None:
        """Send queued writes (bounded wait), stop the writer; safe to call twice."""
        self.stop_writer()
        for client in (self._client, self._probe):
            with contextlib.suppress(*_FAILURES):
                client.close()


def _chunks(blocks: list[Block], size: int) -> Iterator[list[Block]]:
    for i in range(0, len(blocks), size):
        yield blocks[i : i + size]


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
