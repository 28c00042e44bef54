"""The on-disk format of one KV block. Pure Python (no torch).

A block file is ``MAGIC | header length (u32 LE) | header (msgpack) | payload``. The header
names what the payload is the KV of (the cache layout's fingerprint, the block's key, its
parent's key and its token ids) and carries the payload's length and CRC-32. ``decode``
checks all of it against what the reader expects, so a truncated, corrupt, renamed or
foreign file (another model, dtype or layout) is refused rather than read as KV. CRC-32
(zlib) is there against torn writes and bit rot, at about 2 GB/s; the keys and token ids,
not the checksum, are what tie a block to a prompt.
"""

from __future__ import annotations

import struct
import zlib

import msgspec

from tessera.kv.keys import KEY_BYTES

MAGIC = b"TSRKV\x00\x01\x00"
_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 20
"""A header is a few hundred bytes (a block's token ids); more means a foreign file."""


class BlockFileError(Exception):
    """The file is not the block it should be: the message says how."""


class BlockHeader(msgspec.Struct, frozen=True):
    fingerprint: str
    key: bytes
    parent_key: bytes
    token_ids: list[int]
    num_payload_bytes: int
    crc32: int


def encode_header(fingerprint: str, key: int, parent_key: int, token_ids: list[int],
                  payload: memoryview) -> bytes:
    """Everything before the payload (write it, then the payload, to make the file)."""
    header = msgspec.msgpack.encode(BlockHeader(
        fingerprint=fingerprint, key=_b(key), parent_key=_b(parent_key),
        token_ids=list(token_ids),
        num_payload_bytes=payload.nbytes, crc32=zlib.crc32(payload)))
    return MAGIC + _LEN.pack(len(header)) + header


def decode(data: bytes | memoryview, fingerprint: str, key: int, parent_key: int,
           token_ids: list[int]) -> memoryview:
    """The payload of block file ``data``; BlockFileError unless it is exactly the block
    named by these arguments, whole and unaltered."""
    view = memoryview(data)
    header, num_prefix_bytes = _parse_header(view)
    if header.fingerprint != fingerprint:
        raise BlockFileError("written for another model, dtype or cache layout")
    if (header.key != _b(key) or header.parent_key != _b(parent_key)
            or header.token_ids != token_ids):
        raise BlockFileError("holds another prefix than its name says")
    payload = view[num_prefix_bytes:]
    if len(payload) != header.num_payload_bytes:
        raise BlockFileError(
            f"payload is {len(payload)} bytes, the header says {header.num_payload_bytes}")
    if zlib.crc32(payload) != header.crc32:
        raise BlockFileError("payload checksum mismatch")
    return payload


def read_header(data: bytes | memoryview) -> BlockHeader:
    """The header of a block file (for listing a tier); BlockFileError if unreadable.
    ``data`` may be just the file's first bytes."""
    return _parse_header(memoryview(data))[0]


def _parse_header(view: memoryview) -> tuple[BlockHeader, int]:
    """The header and the offset of the payload."""
    start = len(MAGIC) + _LEN.size
    if len(view) < start or bytes(view[: len(MAGIC)]) != MAGIC:
        raise BlockFileError("not a KV block file (bad magic or truncated)")
    (num_header_bytes,) = _LEN.unpack(view[len(MAGIC) : start])
    if num_header_bytes > MAX_HEADER_BYTES or start + num_header_bytes > len(view):
        raise BlockFileError("truncated or oversized header")
    try:
        header = msgspec.msgpack.decode(view[start : start + num_header_bytes], type=BlockHeader)
    except msgspec.DecodeError as e:
        raise BlockFileError(f"unreadable header ({e})") from None
    return header, start + num_header_bytes


def _b(key: int) -> bytes:
    return key.to_bytes(KEY_BYTES, "little")
