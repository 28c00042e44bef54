"""The engine contract: what ``LLM``, the serve engine core and pools of engines drive.

``LLMEngine`` (one process) and ``AFDEngine`` (attention/FFN disaggregated over workers)
implement it; callers use only these members, never an engine's parts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from tessera.config import RuntimeInfo
from tessera.engine.scheduler import SchedulerOutput
from tessera.kv.events import KVEvents
from tessera.outputs import EngineStats, RequestOutput, StepOutput
from tessera.sampling_params import SamplingParams

StepObserver = Callable[[SchedulerOutput], None]
"""Called with every non-empty batch an engine has scheduled, before it runs (the simulator's
probe times steps by their load this way)."""


@runtime_checkable
class Engine(Protocol):
    """Requests in, token deltas and finished outputs out. Not thread-safe: one caller drives
    ``step``; every other member is called from that same thread."""

    @property
    def runtime(self) -> RuntimeInfo:
        """Facts found at start-up: context length, KV blocks, vocabulary, EOS ids."""
        ...

    @property
    def tokenizer(self) -> Any | None:
        """The model's tokenizer, or None when its directory has none (token-id prompts)."""
        ...

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    prompt_text: str | None = None) -> None:
        """Queue a request; ValueError for a bad prompt or an id already in use.
        ``prompt_text`` is the text token-id ``prompt`` came from, kept in its output."""
        ...

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it is unknown or finished."""
        ...

    def step(self) -> list[RequestOutput]:
        """Run until some work is done; returns the requests that finished."""
        ...

    def step_with_deltas(self) -> StepOutput:
        """As ``step``, also returning the token each completion gained."""
        ...

    def has_unfinished_requests(self) -> bool:
        ...

    def stats(self) -> EngineStats:
        ...

    def take_kv_events(self) -> KVEvents | None:
        """Prefix keys the device cache stored and evicted since the last call (the first call
        lists all it holds; see ``tessera.kv.events``), or None if this engine cannot say."""
        ...

    def warm_up(self) -> None:
        """Pay one-time costs before the first request; leaves no trace in stats or cache."""
        ...

    def shutdown(self) -> None:
        """Release processes and memory; safe to call twice."""
        ...
