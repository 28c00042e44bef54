"""Authenticated control frames: how every ZeroMQ message of a worker pool is sealed and opened.

The control sockets listen on TCP when the pool spans hosts (Ray), and anyone who reaches a
port can connect to a ZeroMQ PULL socket. So every frame, on ipc as on TCP (one code path),
carries a MAC under a secret the front draws per pool (``new_secret``) and hands to its
workers out of band (a local worker reads it from its stdin, a Ray actor gets it as an
argument; never on a command line, which ``ps`` shows to every user)::

    mac (32 bytes) | generation (u64) | sender (u32) | sequence (u64) | msgpack body

``mac`` is keyed BLAKE2b over everything after it. The generation binds a frame to one pool
generation (a frame of an older one is dropped), the sender names the socket that sealed it
(the front, or a worker's main loop or heartbeat thread) and the sequence number grows per
sender, so a frame replayed within its generation is dropped too. A frame that is short,
oversized, unsigned, forged, replayed or undecodable is dropped and logged, at most once a
minute per kind: a rogue peer can neither kill nor stall a receiver, nor flood its log.

Sizes: each receiving socket sets ``zmq.MAXMSGSIZE`` to ``frame_limit_bytes`` (ZeroMQ then
drops a peer that sends more before allocating it), and senders never exceed it: a report too
large is split (``split_message``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import struct
import time
from typing import IO, Any

import msgspec
import zmq

from tessera.messages.workers import Heartbeat, StepReport

logger = logging.getLogger(__name__)

MAC_BYTES = 32
SECRET_BYTES = 32
_HEADER = struct.Struct(">QIQ")  # generation, sender, sequence
PREFIX_BYTES = MAC_BYTES + _HEADER.size
FRONT_SENDER = 0xFFFF_FFFF
"""Sender id of the front (the only one an attention worker's input accepts)."""
MAIN_CHANNEL, BEAT_CHANNEL = 0, 1
"""A worker's two sockets to the front: its main loop's and its heartbeat thread's."""

_BASE_BYTES = 4 << 20
"""Stats, token deltas of a step and trace spans fit in this (larger reports are split)."""
_PER_CONTEXT_TOKEN_BYTES = 1 << 10
"""Per token of the context: one finished completion's id, text and top-20 logprobs (about
300 bytes), with room for a few completions of one prompt or a long prompt's text."""
_LOG_EVERY_S = 60.0


def new_secret() -> bytes:
    """A fresh per-pool secret."""
    return secrets.token_bytes(SECRET_BYTES)


def read_secret(stream: IO[str]) -> bytes:
    """The secret a local worker is given on its stdin (one line of hex)."""
    line = stream.readline().strip()
    try:
        secret = bytes.fromhex(line)
    except ValueError:
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise ValueError("no control-frame secret on stdin (workers are started by the front)")
    return secret


def worker_sender(rank: int, channel: int) -> int:
    """Sender id of a worker's socket (``MAIN_CHANNEL`` or ``BEAT_CHANNEL``)."""
    return 2 * rank + channel


def frame_limit_bytes(max_model_len: int) -> int:
    """The largest control frame of a pool whose context is ``max_model_len`` tokens (the
    engine's ``max_model_len``, else the model's ``max_position_embeddings``)."""
    return _BASE_BYTES + max_model_len * _PER_CONTEXT_TOKEN_BYTES


class FrameTooLarge(ValueError):
    """A message does not fit in one control frame."""


def _mac(secret: bytes, data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, key=secret, digest_size=MAC_BYTES).digest()


class FrameWriter:
    """Seals the messages one socket sends (not thread-safe: one per socket)."""

    def __init__(self, secret: bytes, generation: int, sender: int, limit_bytes: int) -> None:
        self._secret = secret
        self.generation = generation
        self._sender = sender
        self.limit_bytes = limit_bytes
        self._seq = 0
        self._encoder = msgspec.msgpack.Encoder()

    def seal(self, msg: Any) -> bytes:
        """The frame of ``msg``; ``FrameTooLarge`` if it exceeds the limit."""
        body = self._encoder.encode(msg)
        if PREFIX_BYTES + len(body) > self.limit_bytes:
            raise FrameTooLarge(
                f"a {type(msg).__name__} of {len(body)} bytes exceeds the control frame limit "
                f"of {self.limit_bytes} bytes"
            )
        self._seq += 1
        signed = _HEADER.pack(self.generation, self._sender, self._seq) + body
        return _mac(self._secret, signed) + signed

    def seal_all(self, msg: Any) -> list[bytes]:
        """``msg`` in as many frames as it needs (see ``split_message``); ``FrameTooLarge``
        only for one element of a report that alone exceeds the limit."""
        try:
            return [self.seal(msg)]
        except FrameTooLarge:
            parts = split_message(msg)
            if parts is None:
                raise
            return [frame for part in parts for frame in self.seal_all(part)]


def split_message(msg: Any) -> tuple[Any, Any] | None:
    """Two messages that carry ``msg``'s content in order, or None if it holds one element.

    A ``StepReport``'s deltas stay ahead of its finished outputs (the front ends a request at
    its finished output and ignores later deltas of it), then come its spans; both parts
    carry the stats. A ``Heartbeat``'s spans are halved."""
    replace = msgspec.structs.replace
    if isinstance(msg, StepReport):
        # Halve the sequence deltas, finished outputs, spans: each part is strictly smaller.
        num_items = len(msg.deltas) + len(msg.finished)
        total = num_items + len(msg.spans)
        if total <= 1:
            return None
        mid = total // 2
        num_deltas = len(msg.deltas)
        cut_deltas, cut_finished = min(mid, num_deltas), max(min(mid, num_items) - num_deltas, 0)
        cut_spans = max(mid - num_items, 0)
        first = replace(msg, deltas=msg.deltas[:cut_deltas],
                        finished=msg.finished[:cut_finished], spans=msg.spans[:cut_spans])
        second = replace(msg, deltas=msg.deltas[cut_deltas:],
                         finished=msg.finished[cut_finished:], spans=msg.spans[cut_spans:])
        return first, second
    if isinstance(msg, Heartbeat) and len(msg.spans) > 1:
        mid = len(msg.spans) // 2
        return replace(msg, spans=msg.spans[:mid]), replace(msg, spans=msg.spans[mid:])
    return None


class DropLog:
    """Logs dropped messages at most once per ``_LOG_EVERY_S`` per kind, with a count (a
    flood of bad messages must not flood the log)."""

    def __init__(self, where: str, what: str = "control frame(s)") -> None:
        self.where = where
        self.what = what
        self.counts: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def drop(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
        now = time.monotonic()
        last = self._logged_at.get(kind)
        if last is None or now - last >= _LOG_EVERY_S:
            logger.warning("%s: dropped %d %s: %s", self.where, self._unlogged[kind],
                           self.what, kind)
            self._logged_at[kind] = now
            self._unlogged[kind] = 0


class FrameReader:
    """Opens the frames one receiving socket takes in; anything not sealed by a holder of the
    secret for this generation, in order, is dropped (see the module docstring)."""

    def __init__(self, secret: bytes, msg_type: Any, generation: int, where: str,
                 from_front: bool) -> None:
        """``from_front``: accept only the front's frames (an attention worker's input);
        otherwise only workers' (the front's socket)."""
        self._secret = secret
        self._decoder = msgspec.msgpack.Decoder(msg_type)
        self._from_front = from_front
        self._last_seq: dict[int, int] = {}
        self.generation = generation
        self.drops = DropLog(where)

    def set_generation(self, generation: int) -> None:
        """Accept frames of ``generation`` from now on (the front, after starting a pool)."""
        self.generation = generation
        self._last_seq.clear()

    def open(self, frame: bytes) -> Any | None:
        """The message in ``frame``, or None if it is dropped."""
        if len(frame) < PREFIX_BYTES:
            self.drops.drop("truncated")
            return None
        view = memoryview(frame)
        if not hmac.compare_digest(_mac(self._secret, view[MAC_BYTES:]), view[:MAC_BYTES]):
            self.drops.drop("bad MAC (forged, or not from this pool)")
            return None
        generation, sender, seq = _HEADER.unpack_from(view, MAC_BYTES)
        if generation != self.generation:
            return None  # an older generation's (or not yet ours): expected after a restart
        if (sender == FRONT_SENDER) != self._from_front:
            self.drops.drop(f"unexpected sender {sender}")
            return None
        if seq <= self._last_seq.get(sender, 0):
            self.drops.drop("replayed")
            return None
        self._last_seq[sender] = seq
        try:
            return self._decoder.decode(view[PREFIX_BYTES:])
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.drops.drop("undecodable body")
            return None


class SealedPush:
    """A PUSH socket that sends messages as sealed frames."""

    def __init__(self, sock: zmq.Socket, writer: FrameWriter) -> None:
        self.sock = sock
        self.writer = writer

    def send(self, msg: Any, flags: int = 0) -> None:
        """Send ``msg`` in as many frames as it needs; ``FrameTooLarge`` (before sending
        anything) if one element of it alone exceeds the limit."""
        for frame in self.writer.seal_all(msg):
            self.sock.send(frame, flags)

    def close(self, linger: int | None = None) -> None:
        self.sock.close(linger=linger)
