"""The server's configuration and the state its handlers share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tessera.serve.engine_client import EngineClient
from tessera.serve.errors import APIError
from tessera.serve.metrics import ServerMetrics


@dataclass(frozen=True)
class ServeConfig:
    """HTTP-side options of ``tessera serve`` (the engine's are in ``EngineConfig``)."""

    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_num_seqs: int = 256
    """The engine's running limit; with ``max_waiting`` it bounds the sequences in flight."""
    max_waiting: int = 1024
    """Sequences allowed to wait beyond ``max_num_seqs``; more get 503 with Retry-After."""
    shutdown_grace_s: float = 30.0
    """On SIGINT/SIGTERM, how long in-flight requests may run before they are aborted."""


@dataclass
class ServerState:
    """What every handler needs: the engine client, tokenizer, metrics and admission count."""

    config: ServeConfig
    client: EngineClient
    tokenizer: Any
    metrics: ServerMetrics
    max_model_len: int
    vocab_size: int
    created_s: int = field(default_factory=lambda: int(time.time()))
    num_seqs_in_flight: int = 0
    shutting_down: bool = False

    def admit(self, num_seqs: int) -> None:
        """Count ``num_seqs`` new sequences in, or raise 503 when the queue is full."""
        self.check_capacity(num_seqs)
        self.num_seqs_in_flight += num_seqs

    def check_capacity(self, num_seqs: int) -> None:
        """Raise 503 (with Retry-After) unless ``num_seqs`` more sequences may start."""
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if not self.client.alive:
            raise APIError(503, "the engine core is not running")
        limit = self.config.max_num_seqs + self.config.max_waiting
        if self.num_seqs_in_flight + num_seqs > limit:
            raise APIError(
                503,
                f"the server is at capacity ({self.num_seqs_in_flight} sequences in flight, "
                f"limit {limit}); retry later",
                headers={"Retry-After": "1"},
            )

    def leave(self, num_seqs: int) -> None:
        self.num_seqs_in_flight -= num_seqs
