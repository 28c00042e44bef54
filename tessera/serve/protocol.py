"""Every message that crosses the ZeroMQ sockets between the API process and the engine core.

Only plain token ids and small metadata travel: the API process tokenizes, detokenizes and
checks stop strings, so the core never sees text. Messages are msgspec structs encoded with
msgpack; each direction has one tagged union, so a decoder knows every type it can receive.
"""

from __future__ import annotations

import msgspec

from tessera.config import EngineConfig
from tessera.sampling_params import SamplingParams


class SamplingOptions(msgspec.Struct, frozen=True):
    """The fields of ``SamplingParams`` that the core needs (stop strings stay in the API)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_params(cls, params: SamplingParams) -> SamplingOptions:
        """The core's half of already validated params (``stop`` is dropped)."""
        return cls(**{name: getattr(params, name) for name in cls.__struct_fields__})

    def to_params(self) -> SamplingParams:
        return SamplingParams(**msgspec.structs.asdict(self))


# ------------------------------------------------------------------ API process -> core
class AddRequest(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    options: SamplingOptions


class AbortRequests(msgspec.Struct, frozen=True, tag=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    """Abort everything and exit."""


CoreInput = AddRequest | AbortRequests | Shutdown


# ------------------------------------------------------------------ core -> API process
class Ready(msgspec.Struct, frozen=True, tag=True):
    """The engine is loaded; the facts the API process needs to validate requests."""

    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    pid: int
    warm_up_s: float = 0.0
    """How long the warm-up (which runs the largest step) took: the API process allows a step
    a multiple of this before it calls the core stalled."""


class StartupFailed(msgspec.Struct, frozen=True, tag=True):
    message: str


class Delta(msgspec.Struct, frozen=True, array_like=True):
    """One new token of completion ``index`` of a request (see ``tessera.outputs.TokenDelta``)."""

    request_id: str
    index: int
    token_id: int
    logprobs: dict[int, float] | None
    finish_reason: str | None


class RequestFailed(msgspec.Struct, frozen=True, array_like=True):
    """The core refused a request (e.g. a ValueError from ``add_request``: 400) or lost it
    (a failed worker in disaggregated serving: 500)."""

    request_id: str
    message: str
    status_code: int = 400


class EngineStats(msgspec.Struct, frozen=True):
    """Scheduler gauges and cumulative counters, sent with every step."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    num_prompt_tokens_total: int = 0
    num_generation_tokens_total: int = 0
    num_prefix_queried_tokens_total: int = 0
    num_prefix_hit_tokens_total: int = 0


class StepResult(msgspec.Struct, frozen=True, tag=True):
    """What one pass of the core loop produced (sent after a step or after handling inputs).

    It is also the core's heartbeat: a core that sends none while requests are pending is
    stalled. ``pid`` tells a restarted core's results from a dead one's still in the socket.
    """

    deltas: list[Delta]
    failed: list[RequestFailed]
    stats: EngineStats
    pid: int = 0


CoreOutput = Ready | StartupFailed | StepResult


class CoreConfig(msgspec.Struct, frozen=True):
    """How the engine-core process is started (passed as JSON on its command line)."""

    engine: EngineConfig
    input_address: str
    output_address: str
    parent_pid: int
