"""The address of a remote KV store (``kv_store``), checked where it enters. Pure Python.

A remote tier speaks the Redis protocol (Redis or Valkey, see docs/kv_tiers.md), so the
address is a ``redis://`` URL: ``redis://HOST[:PORT][/DB]``, with an optional
``USER:PASSWORD@`` before the host for a server that requires AUTH.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import urlsplit

DEFAULT_PORT = 6379
SCHEME = "redis"


class StoreAddress(NamedTuple):
    host: str
    port: int
    db: int
    has_credentials: bool


def parse_store_url(url: str) -> StoreAddress:
    """The parts of ``url``; ValueError saying what is wrong unless it is
    ``redis://[USER:PASSWORD@]HOST[:PORT][/DB]``."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"kv_store must be redis://HOST[:PORT][/DB], got {url!r}")
    shown = redact(url)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port out of range or not a number
    except ValueError:
        raise ValueError(f"kv_store {shown!r}: the port must be a number in 1..65535") from None
    if parts.scheme != SCHEME:
        raise ValueError(f"kv_store must be redis://HOST[:PORT][/DB], got {shown!r}")
    if not parts.hostname:
        raise ValueError(f"kv_store {shown!r} names no host")
    if port == 0:
        raise ValueError(f"kv_store {shown!r}: the port must be a number in 1..65535")
    if parts.query or parts.fragment:
        raise ValueError(f"kv_store {shown!r}: no query or fragment is understood")
    path = parts.path.strip("/")
    if path and not (path.isdigit() and path.isascii()):
        raise ValueError(f"kv_store {shown!r}: the path must be a database number (/0)")
    return StoreAddress(parts.hostname, port or DEFAULT_PORT, int(path or 0),
                        parts.username is not None or parts.password is not None)


def redact(url: str) -> str:
    """``url`` without its credentials, for logs and messages."""
    scheme, sep, rest = str(url).partition("://")
    netloc, slash, tail = rest.partition("/")
    if not sep or "@" not in netloc:
        return str(url)
    return f"{scheme}://***@{netloc.rpartition('@')[2]}{slash}{tail}"
