"""Prefix-cache keys of KV blocks. Pure Python (no torch).

The key of full block i is a digest of (key of block i-1, token ids of block i), so equal keys
mean equal whole prefixes. The digest is a 128-bit BLAKE2b rather than Python's
``hash``: keys name blocks in tiers that outlive the process and are shared between engines,
so they must be the same in every process, and a client must not be able to craft a prompt
whose key collides with another user's prefix (the tuple hash of ints is neither seeded nor
collision-resistant). Tiers still compare the stored token ids on load.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NamedTuple


class Block(NamedTuple):
    """A full block as tiers name and check it."""

    key: int
    parent_key: int
    token_ids: list[int]


ROOT_KEY = 0
"""The parent key of block 0."""

KEY_BYTES = 16


def block_key(parent_key: int, token_ids: Sequence[int]) -> int:
    """The key of a full block holding ``token_ids`` after the prefix named ``parent_key``."""
    data = parent_key.to_bytes(KEY_BYTES, "little") + struct.pack(
        f"<{len(token_ids)}q", *token_ids)
    return int.from_bytes(hashlib.blake2b(data, digest_size=KEY_BYTES).digest(), "little")


def key_hex(key: int) -> str:
    """The key as 32 hex digits (file names, logs)."""
    return key.to_bytes(KEY_BYTES, "little").hex()
