"""An ``AFDEngine`` front and its attention and FFN workers (``tessera.afd``).

Requests, per-step token deltas, finished outputs, stats, heartbeats and trace spans travel
here, sealed (``tessera.afd.frames``); hidden states travel on the data plane
(``tessera.afd.dataplane``). Every worker pushes to the front's one PULL socket; the front
pushes to each attention worker's own PULL socket.
"""

from __future__ import annotations

import msgspec

from tessera.afd.trace import Span
from tessera.config import AFDConfig, EngineConfig
from tessera.messages.common import AbortRequests, AddRequest, Ready, Shutdown, StartupFailed
from tessera.outputs import EngineStats, RequestOutput, TokenDelta


class WorkerConfig(msgspec.Struct, frozen=True):
    """Everything a worker process is started with (passed as JSON on its command line, so
    nothing secret: the pool's control-frame secret travels apart, see ``frames.py``)."""

    role: str  # "attention" or "ffn"
    index: int  # among workers of its role
    rank: int  # on the data plane
    generation: int  # of the pool; messages of an older generation are ignored
    engine: EngineConfig
    afd: AFDConfig
    master_port: int
    front_address: str
    input_address: str | None  # attention workers only
    parent_pid: int  # 0: no parent to watch (a Ray actor; Ray ends it with its owner)
    master_addr: str = "127.0.0.1"  # data-plane rendezvous: the host of rank 0
    host_addr: str = "127.0.0.1"  # this worker's address: its data-plane sockets bind to it
    plane_dir: str | None = None  # the shared-memory data plane's directory; None: torch
    ipc_dir: str | None = None  # the front's ipc sockets; a worker outliving the front removes it
    frame_limit_bytes: int = 16 << 20  # largest control frame; the launcher sets it from the
    # engine's limits (``frames.frame_limit_bytes``)

    @property
    def name(self) -> str:
        return f"{self.afd.worker_name(self.rank)}.g{self.generation}"


WorkerInput = AddRequest | AbortRequests | Shutdown
"""Front -> attention worker."""


class StepReport(msgspec.Struct, frozen=True, tag=True):
    """One engine step of an attention worker (also sent after inputs alone, for stats)."""

    worker: str
    deltas: list[TokenDelta]
    finished: list[RequestOutput]
    stats: EngineStats
    spans: list[Span] = []


class StepFailed(msgspec.Struct, frozen=True, tag=True):
    """A step could not finish (a transfer failed or missed its deadline)."""

    worker: str
    message: str


class Heartbeat(msgspec.Struct, frozen=True, tag=True):
    worker: str
    spans: list[Span] = []
    sent_s: float = 0.0
    """Wall-clock send time: the front's shutdown waits for a beat sent after it began, which
    carries every span the worker recorded."""
    progress: int = 0
    """Units of work the worker's main loop has done (``progress.Progress``): a beating
    worker whose count stands still while it has work is stalled."""
    state: str = "idle"
    """What the main loop does: ``idle`` (no work), ``busy`` (working) or ``waiting`` (on a
    peer's transfer, which has its own deadline)."""


FrontInput = Ready | StartupFailed | StepReport | StepFailed | Heartbeat
"""Any worker -> front."""
