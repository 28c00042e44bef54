"""The host KV store: one process that owns a shared-memory arena of KV blocks, so the
engines of a host (several ``tessera serve`` instances, the attention workers of a
Transformerless pool) share one host tier (``tessera kv store``). Pure Python (no torch).

Engines send small requests over a ZeroMQ REP socket (``tessera.messages.kv_store``) and copy
KV bytes straight into and out of the arena. The arena starts with one 8-byte generation per
slot, then the slots. Invariants:

- A slot's generation is even while it is free or holds a committed block, odd while a writer
  fills it. ``Reserve`` makes it odd before answering, ``Commit`` makes it even again and
  publishes the key; only committed slots are handed to readers.
- A reader copies a slot and then checks its generation is the one ``Acquire`` gave: a slot
  reused meanwhile (evicted for another writer) has a newer generation, and the reader drops
  what it copied (a failed load: recomputed, never used).
- A reservation not committed within ``RESERVATION_TIMEOUT_S`` (its writer died) is taken back.
- A pinned key (``Pin``, a lease of at most ``MAX_LEASE_S``) is not evicted until it is
  unpinned or its lease ends; when every block the eviction looks at is pinned, a writer
  gets no slot (its block is simply not stored), never a pinned block's.

The first engine to attach fixes the layout (fingerprint and block size); an engine with
another layout is refused and runs without the shared tier.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import mmap
import os
import secrets
import signal
import time
from collections import OrderedDict
from pathlib import Path

import msgspec
import zmq

from tessera.messages.kv_store import (
    Acquire,
    Attach,
    Attached,
    BlockRef,
    Commit,
    Done,
    Found,
    Lookup,
    Pin,
    Reserve,
    Slots,
    StoreError,
    StoreReply,
    StoreRequest,
    Unpin,
)

logger = logging.getLogger(__name__)

RESERVATION_TIMEOUT_S = 30.0
MAX_LEASE_S = 600.0
EVICTION_SCAN = 4096
"""Least recently used blocks an eviction looks at for one that is not pinned. Pinned keys
move to the most recent end when pinned and when committed, so the oldest are rarely
pinned."""
MAX_REQUEST_BYTES = 8 << 20
"""A request names at most a few thousand blocks; more is not an engine talking."""
SHM_DIR = "/dev/shm"


def data_offset(num_slots: int) -> int:
    """Where the slots start in the arena: after the generations, 64-byte aligned."""
    return -(-8 * num_slots // 64) * 64


class Arena:
    """The shared memory: generations, then ``num_slots`` slots of ``block_bytes``."""

    def __init__(self, capacity_bytes: int, block_bytes: int) -> None:
        self.block_bytes = block_bytes
        self.num_slots = capacity_bytes // (block_bytes + 8)
        if self.num_slots < 1:
            raise ValueError(f"a store of {capacity_bytes} bytes holds no block of "
                             f"{block_bytes} bytes")
        self.data_offset = data_offset(self.num_slots)
        # A file on a tmpfs, mapped by the store and every engine (as the shared-memory data
        # plane does); created 0600, so only this user's engines can map it.
        self.path = Path(SHM_DIR) / f"tessera-kv-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.data_offset + self.num_slots * block_bytes)
            self.mm = mmap.mmap(fd, self.data_offset + self.num_slots * block_bytes)
        finally:
            os.close(fd)
        self.generations = memoryview(self.mm)[: 8 * self.num_slots].cast("Q")

    def close(self) -> None:
        self.generations.release()
        self.mm.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Store:
    """The index over the arena; ``handle`` answers one request. Single-threaded."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.epoch = secrets.token_hex(8)
        self.arena: Arena | None = None
        self.fingerprint: str | None = None
        self.index: OrderedDict[bytes, int] = OrderedDict()  # key -> slot, LRU first
        self.holds: dict[int, tuple[bytes, bytes, list[int]]] = {}  # committed slot -> block
        self.reserved: dict[int, tuple[bytes, bytes, list[int], int, float]] = {}
        self.reserved_keys: set[bytes] = set()
        self.free_slots: list[int] = []
        self.pinned: dict[bytes, float] = {}  # key -> end of its lease (monotonic seconds)

    def handle(self, request: StoreRequest) -> StoreReply:
        if isinstance(request, Attach):
            return self._attach(request)
        if self.arena is None:
            return StoreError("attach first")
        if isinstance(request, Lookup):
            n = 0
            for key in request.keys:
                if key not in self.index:
                    break
                n += 1
            return Found(n)
        if isinstance(request, Acquire):
            return Slots(self._acquire(request.blocks))
        if isinstance(request, Reserve):
            return Slots([self._reserve(b) for b in request.blocks])
        if isinstance(request, Commit):
            for key, slot, generation in request.entries:
                self._commit(key, slot, generation)
            return Done()
        if isinstance(request, Pin):
            return self._pin(request)
        if isinstance(request, Unpin):
            for key in request.keys:
                self.pinned.pop(key, None)
            return Done()
        return StoreError("unknown request")

    def _attach(self, request: Attach) -> StoreReply:
        if self.arena is None:
            if not 0 < request.block_bytes <= self.capacity_bytes:
                return StoreError(f"block of {request.block_bytes} bytes does not fit")
            self.arena = Arena(self.capacity_bytes, request.block_bytes)
            self.fingerprint = request.fingerprint
            self.free_slots = list(range(self.arena.num_slots - 1, -1, -1))
            logger.info("KV store: %d slots of %d bytes for layout %s", self.arena.num_slots,
                        request.block_bytes, request.fingerprint)
        elif (request.fingerprint, request.block_bytes) != (self.fingerprint,
                                                             self.arena.block_bytes):
            return StoreError("the store holds another model or cache layout")
        return Attached(str(self.arena.path), self.arena.num_slots, self.epoch)

    def _acquire(self, blocks: list[BlockRef]) -> list[tuple[int, int] | None]:
        assert self.arena is not None
        found: list[tuple[int, int] | None] = []
        for b in blocks:
            slot = self.index.get(b.key)
            if slot is None or self.holds[slot] != (b.key, b.parent_key, b.token_ids):
                break
            self.index.move_to_end(b.key)
            found.append((slot, self.arena.generations[slot]))
        return found

    def _reserve(self, b: BlockRef) -> tuple[int, int] | None:
        assert self.arena is not None
        if b.key in self.index or b.key in self.reserved_keys:
            return None
        self._reclaim_stale()
        if self.free_slots:
            slot = self.free_slots.pop()
        else:
            victim = self._victim()
            if victim is None:
                return None  # every slot is being written, or pinned
            slot = self.index.pop(victim)
            del self.holds[slot]
        generation = self.arena.generations[slot] + 1  # odd: being written
        self.arena.generations[slot] = generation
        self.reserved[slot] = (b.key, b.parent_key, list(b.token_ids), generation,
                               time.monotonic())
        self.reserved_keys.add(b.key)
        return slot, generation

    def _victim(self) -> bytes | None:
        """The least recently used key not under a lease (expired leases end here)."""
        now = time.monotonic()
        for n, key in enumerate(self.index):
            if n >= EVICTION_SCAN:
                return None
            until = self.pinned.get(key)
            if until is None:
                return key
            if until < now:
                del self.pinned[key]
                return key
        return None

    def _pin(self, request: Pin) -> StoreReply:
        assert self.arena is not None
        if not 0 < request.lease_s <= MAX_LEASE_S:
            return StoreError(f"a lease is over 0 and at most {MAX_LEASE_S:g} s")
        now = time.monotonic()
        if len(self.pinned) + len(request.keys) > 4 * self.arena.num_slots:
            self.pinned = {k: t for k, t in self.pinned.items() if t >= now}
            if len(self.pinned) + len(request.keys) > 4 * self.arena.num_slots:
                return StoreError("too many pinned blocks")
        for key in request.keys:
            self.pinned[key] = now + request.lease_s
            if key in self.index:
                self.index.move_to_end(key)
        return Done()

    def _commit(self, key: bytes, slot: int, generation: int) -> None:
        assert self.arena is not None
        entry = self.reserved.get(slot)
        if entry is None or entry[0] != key or entry[3] != generation:
            return  # taken back meanwhile: the block is simply not stored
        del self.reserved[slot]
        self.reserved_keys.discard(key)
        self.arena.generations[slot] = generation + 1
        self.index[key] = slot
        self.holds[slot] = (key, entry[1], entry[2])

    def _reclaim_stale(self) -> None:
        assert self.arena is not None
        now = time.monotonic()
        for slot, entry in list(self.reserved.items()):
            if now - entry[4] > RESERVATION_TIMEOUT_S:
                del self.reserved[slot]
                self.reserved_keys.discard(entry[0])
                self.arena.generations[slot] = entry[3] + 1
                self.free_slots.append(slot)

    def close(self) -> None:
        if self.arena is not None:
            self.arena.close()


def remove_stale_arenas() -> None:
    """Delete the arenas of stores that died without cleaning up (killed): their names carry
    the owner's pid."""
    for path in Path(SHM_DIR).glob("tessera-kv-*-*"):
        try:
            pid = int(path.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, another user's


def serve(address: str, capacity_bytes: int, ready_file: str | None = None,
          parent_pid: int = 0) -> int:
    """Answer engines on ``address`` (``ipc://PATH``) until SIGINT or SIGTERM, or until the
    process ``parent_pid`` (when not 0) is no longer this one's parent."""
    remove_stale_arenas()
    store = Store(capacity_bytes)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
    sock.setsockopt(zmq.LINGER, 0)
    if address.startswith("ipc://"):
        path = Path(address.removeprefix("ipc://"))
        path.unlink(missing_ok=True)
        old_umask = os.umask(0o077)  # only this user's engines may talk to the store
        try:
            sock.bind(address)
        finally:
            os.umask(old_umask)
    else:
        raise ValueError(f"the KV store listens on ipc://PATH, got {address!r}")
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    decoder = msgspec.msgpack.Decoder(StoreRequest)
    encoder = msgspec.msgpack.Encoder()
    if ready_file:
        Path(ready_file).write_text(store.epoch)
    try:
        while not stop:
            if not sock.poll(200):
                if parent_pid and os.getppid() != parent_pid:
                    logger.info("the engine that started this store has exited; stopping")
                    break
                continue
            frame = sock.recv()
            try:
                reply: StoreReply = store.handle(decoder.decode(frame))
            except (msgspec.DecodeError, msgspec.ValidationError):
                reply = StoreError("malformed request")
            except ValueError as e:  # the arena could not be made
                reply = StoreError(str(e))
            sock.send(encoder.encode(reply))
    finally:
        sock.close()
        ctx.term()
        store.close()
        if address.startswith("ipc://"):
            Path(address.removeprefix("ipc://")).unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tessera kv store", description=__doc__.split("\n")[0])
    p.add_argument("--address", required=True, help="ipc://PATH to listen on")
    p.add_argument("--memory", type=int, required=True, help="bytes of shared memory")
    p.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="tessera kv store: %(message)s")
    if args.memory <= 0:
        p.error("--memory must be positive bytes")
    return serve(args.address, args.memory, args.ready_file, args.parent_pid)


if __name__ == "__main__":
    raise SystemExit(main())
