"""Control messages between the front and its workers (ZeroMQ, msgpack-encoded msgspec structs).

Only control travels here: requests, per-step token deltas, finished outputs, stats,
heartbeats and trace spans. Hidden states travel on the data plane (``dataplane.py``).
Every worker pushes to the front's one PULL socket; the front pushes to each attention
worker's own PULL socket. Each direction is one tagged union so a decoder knows every type.
"""

from __future__ import annotations

import msgspec

from tessera.afd.config import AFDConfig
from tessera.afd.trace import Span
from tessera.config import EngineConfig
from tessera.outputs import RequestOutput, TokenDelta
from tessera.sampling_params import SamplingParams


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


# ------------------------------------------------------------------ front -> attention worker
class AddRequest(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


class AbortRequests(msgspec.Struct, frozen=True, tag=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    """Exit now."""


WorkerInput = AddRequest | AbortRequests | Shutdown


# ------------------------------------------------------------------ any worker -> front
class WorkerStats(msgspec.Struct, frozen=True):
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    num_prompt_tokens_total: int = 0
    num_generation_tokens_total: int = 0
    num_prefix_queried_tokens_total: int = 0
    num_prefix_hit_tokens_total: int = 0


class Ready(msgspec.Struct, frozen=True, tag=True):
    worker: str
    pid: int
    max_model_len: int = 0
    num_kv_blocks: int = 0


class StartupFailed(msgspec.Struct, frozen=True, tag=True):
    worker: str
    message: str


class StepReport(msgspec.Struct, frozen=True, tag=True):
    """One engine step of an attention worker (also sent after inputs alone, for stats)."""

    worker: str
    deltas: list[TokenDelta]
    finished: list[RequestOutput]
    stats: WorkerStats
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
