"""Messages between engines and the host KV store process (``tessera kv store``).

Requests go over one ZeroMQ REQ socket per engine; KV bytes never travel here, only slot
numbers in the store's shared-memory arena (the data plane). Keys are the 16-byte prefix keys
of ``tessera.kv.keys``.
"""

from __future__ import annotations

import msgspec


class Attach(msgspec.Struct, frozen=True, tag=True):
    """An engine joins: the layout it stores. The first attach fixes the store's layout."""

    fingerprint: str
    block_bytes: int


class Attached(msgspec.Struct, frozen=True, tag=True):
    shm_path: str
    """The arena: a file on a tmpfs to map."""
    num_slots: int
    epoch: str
    """Changes with every store process: an engine whose epoch is stale re-attaches."""


class Lookup(msgspec.Struct, frozen=True, tag=True):
    """How many leading ``keys`` the store holds (committed)."""

    keys: list[bytes]


class Found(msgspec.Struct, frozen=True, tag=True):
    num_keys: int


class BlockRef(msgspec.Struct, frozen=True):
    key: bytes
    parent_key: bytes
    token_ids: list[int]


class Acquire(msgspec.Struct, frozen=True, tag=True):
    """Where the leading blocks of ``blocks`` are, for reading; a block is only returned if
    the store holds it for exactly that parent and tokens."""

    blocks: list[BlockRef]


class Reserve(msgspec.Struct, frozen=True, tag=True):
    """Slots to write ``blocks`` into (blocks the store already holds get none)."""

    blocks: list[BlockRef]


class Slots(msgspec.Struct, frozen=True, tag=True):
    """Per block asked for: (slot, generation), or None. A reader copies the slot and then
    checks that the slot's generation in shared memory is unchanged; a writer fills it and
    sends ``Commit`` with the same pairs."""

    slots: list[tuple[int, int] | None]


class Commit(msgspec.Struct, frozen=True, tag=True):
    """The writer filled these reserved slots (key, slot, generation)."""

    entries: list[tuple[bytes, int, int]]


class Pin(msgspec.Struct, frozen=True, tag=True):
    """Keep these blocks (held or still to come) from eviction for ``lease_s`` seconds, or
    until ``Unpin``: a prefill instance's blocks until a decode instance has loaded them."""

    keys: list[bytes]
    lease_s: float


class Unpin(msgspec.Struct, frozen=True, tag=True):
    keys: list[bytes]


class Done(msgspec.Struct, frozen=True, tag=True):
    pass


class StoreError(msgspec.Struct, frozen=True, tag=True):
    message: str


StoreRequest = Attach | Lookup | Acquire | Reserve | Commit | Pin | Unpin
StoreReply = Attached | Found | Slots | Done | StoreError
