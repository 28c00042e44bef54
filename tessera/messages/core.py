"""The API process and its engine-core process (``tessera.serve``).

The API process tokenizes, detokenizes and checks stop strings, so the core never sees text:
``AddRequest.params`` arrives with ``stop`` cleared.
"""

from __future__ import annotations

import msgspec

from tessera.config import EngineConfig
from tessera.kv.events import KVEvents
from tessera.messages.common import AbortRequests, AddRequest, Ready, Shutdown, StartupFailed
from tessera.outputs import EngineStats, RequestOutput

CoreInput = AddRequest | AbortRequests | Shutdown
"""API process -> core."""


class Delta(msgspec.Struct, frozen=True, array_like=True):
    """One new token of completion ``index`` of a request (see ``tessera.outputs.TokenDelta``)."""

    request_id: str
    index: int
    token_id: int
    logprobs: dict[int, float] | None
    finish_reason: str | None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """On a completion's first token, if requested (a list of floats: small enough here)."""
    prompt_token_ranks: list[int | None] | None = None


class RequestFailed(msgspec.Struct, frozen=True, array_like=True):
    """The core refused a request (e.g. a ValueError from ``add_request``: 400) or lost it
    (a failed worker in disaggregated serving: 500)."""

    request_id: str
    message: str
    status_code: int = 400


class CoreStep(msgspec.Struct, frozen=True, tag=True):
    """What one pass of the core loop produced (sent after a step or after handling inputs).

    It is also the core's heartbeat: a core that sends none while requests are pending is
    stalled. ``pid`` tells a restarted core's results from a dead one's still in the socket.
    """

    deltas: list[Delta]
    failed: list[RequestFailed]
    stats: EngineStats
    pid: int = 0
    finished: list[RequestOutput] = []
    """Only to a cluster front (``CoreConfig.instance``): the requests that finished."""
    kv_events: KVEvents | None = None
    """Only to a cluster front: the prefix keys the device cache stored and evicted."""


CoreOutput = Ready | StartupFailed | CoreStep
"""Core -> API process."""


class CurveKeys(msgspec.Struct, frozen=True):
    """ZeroMQ CURVE keys (Z85) of a core whose sockets are TCP: its own pair, and the public
    key of the one front it talks to. Each end admits only the other's key."""

    core_public: bytes
    core_secret: bytes
    front_public: bytes


class CoreConfig(msgspec.Struct, frozen=True):
    """How the engine-core process is started (passed as JSON on its command line)."""

    engine: EngineConfig
    input_address: str
    output_address: str
    parent_pid: int
    """The process whose exit ends the core; 0: none (a Ray actor, which Ray ends with its
    owner)."""
    instance: bool = False
    curve: CurveKeys | None = None
    """TCP sockets (instances on other hosts): encrypted, and admitting only the front."""
    publish_kv_events: bool = False
    """Send the KV events with every step (a served engine's ``/kv_events`` feed)."""
    """Run as one instance of a cluster (``tessera.cluster``): each ``CoreStep`` also carries
    finished outputs and KV events."""
