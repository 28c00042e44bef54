"""Leases on handed-over blocks: between a prefill instance's finish and a decode instance's
load, the prompt's full blocks in the shared host store are pinned, so that other writers do
not evict them meanwhile (the decode instance would then compute them again).

The cluster front takes a lease (``hold``) when it hands a request over and gives it back
(``release``) once the decode instance has produced a token (its loads are done) or the request
ends. A lease also ends by itself after ``LEASE_S``, so a lost release costs nothing but
space. The store is asked with a deadline; a store that does not answer only loses the pins
(the handoff still works, by recompute where a block is gone).
"""

from __future__ import annotations

import logging

import msgspec
import zmq

from tessera.kv.keys import KEY_BYTES, ROOT_KEY, block_key
from tessera.messages.kv_store import Done, Pin, StoreReply, StoreRequest, Unpin

logger = logging.getLogger(__name__)

LEASE_S = 60.0
"""Longest a handed-over request's blocks stay pinned without a release."""
TIMEOUT_MS = 1000


class HandoffLeases:
    """Pins in the host store at ``address`` for requests handed over, by request id."""

    def __init__(self, ctx: zmq.Context, address: str, block_size: int) -> None:
        self._ctx = ctx
        self.address = address
        self.block_size = block_size
        self._sock: zmq.Socket | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(StoreReply)
        self._held: dict[str, list[bytes]] = {}
        self.num_leases = 0
        """Leases taken (each released, or ended by the store after ``LEASE_S``)."""
        self.num_failed_calls = 0

    def keys(self, prompt_ids: list[int]) -> list[bytes]:
        """Store keys of the full blocks a decode instance loads for ``prompt_ids`` (all but
        the block of the last token, which it computes)."""
        out, parent, bs = [], ROOT_KEY, self.block_size
        for start in range(0, (len(prompt_ids) - 1) // bs * bs, bs):
            parent = block_key(parent, prompt_ids[start:start + bs])
            out.append(parent.to_bytes(KEY_BYTES, "little"))
        return out

    def hold(self, request_id: str, prompt_ids: list[int]) -> None:
        keys = self.keys(prompt_ids)
        if keys and self._call(Pin(keys, LEASE_S)):
            self._held[request_id] = keys
            self.num_leases += 1

    def release(self, request_id: str) -> None:
        keys = self._held.pop(request_id, None)
        if keys:
            self._call(Unpin(keys))

    @property
    def num_held(self) -> int:
        return len(self._held)

    def _call(self, request: StoreRequest) -> bool:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.address)
        try:
            self._sock.send(self._encoder.encode(request))
            if self._sock.poll(TIMEOUT_MS):
                reply = self._decoder.decode(self._sock.recv())
                if isinstance(reply, Done):
                    return True
                # A store started again answers "attach first" until an engine has attached:
                # nothing is pinned there yet, and nothing needs saying.
                level = logging.DEBUG if "attach first" in str(reply) else logging.WARNING
                logger.log(level, "KV store at %s refused a lease: %s", self.address, reply)
                return False
        except (zmq.ZMQError, msgspec.DecodeError, msgspec.ValidationError):
            pass
        # No answer in time: a REQ socket cannot send again before a reply, so start over.
        self.num_failed_calls += 1
        self._sock.close(linger=0)
        self._sock = None
        return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
