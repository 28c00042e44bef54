"""The host tier as a client of the host KV store (``tessera.kv.store``): engines of one host
share its arena.

Every request to the store has a deadline. A store that does not answer (killed, stalled) or
refuses this engine's layout makes the tier empty at once: lookups find nothing, saves are
dropped, and the engine recomputes; one warning per outage. The engine tries to reattach,
at growing intervals up to ``MAX_RETRY_S``, and finds a restarted store (a new epoch and
arena) by itself. A probe costs a ``stat`` of the socket path while there is none, and at
most ``PROBE_TIMEOUT_S`` when there is one that does not answer: an outage does not stall
the step loop.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import time

import msgspec
import torch
import zmq

from tessera.kv.host_tier import CopyFn
from tessera.kv.keys import KEY_BYTES, Block
from tessera.kv.stats import TierCounters
from tessera.kv.store import data_offset
from tessera.messages.kv_store import (
    Acquire,
    Attach,
    Attached,
    BlockRef,
    Commit,
    Done,
    Found,
    Lookup,
    Reserve,
    Slots,
    StoreError,
    StoreReply,
    StoreRequest,
)
from tessera.outputs import KVTierStats

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 0.25
MAX_RETRY_S = 30.0


def _b(key: int) -> bytes:
    return key.to_bytes(KEY_BYTES, "little")


class SharedHostTier:
    """The batch interface of ``HostTier`` over a store at ``address`` (``ipc://PATH``)."""

    def __init__(self, address: str, fingerprint: str, block_bytes: int,
                 timeout_s: float = 2.0, retry_s: float = 5.0) -> None:
        if not address.startswith("ipc://"):
            raise ValueError(f"kv_host_store must be ipc://PATH, got {address!r}")
        self.address = address
        self.fingerprint = fingerprint
        self.block_bytes = block_bytes
        self.timeout_ms = int(timeout_s * 1000)
        self.retry_s = retry_s
        self.counters = TierCounters("host", 0)
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(StoreReply)
        self._epoch: str | None = None
        self._mm: mmap.mmap | None = None
        self._generations: memoryview | None = None
        self._slots: torch.Tensor | None = None  # [num_slots, block_bytes] uint8
        self._num_slots = 0
        self._retry_at = 0.0
        self._retry_s = retry_s
        self._refused = False
        self._down_reason: str | None = None
        self._attach()

    # ----------------------------------------------------------------- connection
    @property
    def attached(self) -> bool:
        return self._sock is not None and self._slots is not None

    def _attach(self) -> bool:
        if not os.path.exists(self.address.removeprefix("ipc://")):
            self._down("is not running")
            return False
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        self._sock = sock
        reply = self._call(Attach(self.fingerprint, self.block_bytes), attaching=True)
        if isinstance(reply, StoreError):
            if not self._refused:
                logger.warning("KV store at %s refused this engine (%s); running without the "
                               "shared host tier", self.address, reply.message)
            self._refused = True
            self._close_socket()
            return False
        if not isinstance(reply, Attached):
            return False
        if reply.epoch != self._epoch:
            self._map(reply)
        if self._down_reason is not None:
            logger.warning("KV store at %s is back; the shared host tier is in use again",
                           self.address)
            self._down_reason = None
        self._retry_s = self.retry_s
        return True

    def _map(self, reply: Attached) -> None:
        self._unmap()
        fd = os.open(reply.shm_path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        offset = data_offset(reply.num_slots)
        if size < offset + reply.num_slots * self.block_bytes:
            mm.close()
            raise OSError(f"KV store arena {reply.shm_path} is smaller than it says")
        self._mm = mm
        self._generations = memoryview(mm)[: 8 * reply.num_slots].cast("Q")
        self._slots = torch.frombuffer(mm, dtype=torch.uint8, offset=offset,
                                       count=reply.num_slots * self.block_bytes
                                       ).view(reply.num_slots, self.block_bytes)
        self._num_slots = reply.num_slots
        self._epoch = reply.epoch
        self.counters.capacity_bytes = reply.num_slots * self.block_bytes

    def _unmap(self) -> None:
        self._slots = None
        if self._generations is not None:
            self._generations.release()
            self._generations = None
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # a copy in flight still holds it
                self._mm.close()
            self._mm = None

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _down(self, reason: str) -> None:
        self._close_socket()
        if self._down_reason is None:
            logger.warning("KV store at %s %s; running without the shared host tier until "
                           "it answers", self.address, reason)
            self._down_reason = reason
            self._retry_s = self.retry_s
        else:
            self._retry_s = min(2 * self._retry_s, MAX_RETRY_S)
        self._retry_at = time.monotonic() + self._retry_s

    def _call(self, request: StoreRequest, attaching: bool = False) -> StoreReply | None:
        """The store's answer, or None (and the tier is down) if it gives none in time."""
        if self._refused:
            return None
        if self._sock is None and (attaching or time.monotonic() < self._retry_at
                                   or not self._attach()):
            return None
        sock = self._sock
        assert sock is not None
        try:
            sock.send(self._encoder.encode(request))
            timeout_ms = (min(self.timeout_ms, int(PROBE_TIMEOUT_S * 1000))
                          if attaching and self._down_reason is not None else self.timeout_ms)
            if not sock.poll(timeout_ms):
                self._down("does not answer")
                return None
            reply = self._decoder.decode(sock.recv())
        except (zmq.ZMQError, msgspec.DecodeError, msgspec.ValidationError) as e:
            self._down(f"failed ({e})")
            return None
        if isinstance(reply, StoreError) and not attaching:
            if reply.message == "attach first":  # a new store at the same address
                self._epoch = None
                self._close_socket()
                return None
            logger.warning("KV store at %s: %s", self.address, reply.message)
            return None
        return reply

    # ----------------------------------------------------------------- tier interface
    def num_leading(self, keys: list[int]) -> int:
        if not keys:
            return 0
        reply = self._call(Lookup([_b(k) for k in keys]))
        return reply.num_keys if isinstance(reply, Found) else 0

    def load(self, blocks: list[Block], copy: CopyFn) -> int:
        reply = self._call(Acquire([BlockRef(_b(b.key), _b(b.parent_key), b.token_ids)
                                    for b in blocks]))
        slots, generations = self._slots, self._generations
        if not isinstance(reply, Slots) or slots is None or generations is None:
            return 0
        n = 0
        for j, found in enumerate(reply.slots):
            if found is None or j >= len(blocks):
                break
            slot, generation = found
            if not 0 <= slot < self._num_slots:
                break
            start = time.perf_counter()
            copy(j, slots[slot])
            if generations[slot] != generation:  # reused while copied: drop it
                break
            with self.counters.lock:
                self.counters.load_s.observe(time.perf_counter() - start)
            n += 1
        return n

    def store(self, blocks: list[Block], fill: CopyFn) -> None:
        if not blocks:
            return
        reply = self._call(Reserve([BlockRef(_b(b.key), _b(b.parent_key), b.token_ids)
                                    for b in blocks]))
        slots = self._slots
        if not isinstance(reply, Slots) or slots is None:
            with self.counters.lock:
                self.counters.num_dropped_saves += len(blocks)
            return
        entries = []
        for j, found in enumerate(reply.slots[: len(blocks)]):
            if found is None:
                continue
            slot, generation = found
            if not 0 <= slot < self._num_slots:
                continue
            start = time.perf_counter()
            fill(j, slots[slot])
            entries.append((_b(blocks[j].key), slot, generation))
            with self.counters.lock:
                self.counters.num_written_bytes += self.block_bytes
                self.counters.save_s.observe(time.perf_counter() - start)
        if entries and not isinstance(self._call(Commit(entries)), Done):
            with self.counters.lock:
                self.counters.num_dropped_saves += len(entries)

    def stats(self) -> KVTierStats:
        return self.counters.snapshot(0, 0, writable=self.attached)

    def close(self) -> None:
        self._close_socket()
        self._unmap()
        self._ctx.term()
