"""Messages shared by every boundary: a process hosting an engine (the serve engine core, an
attention worker) takes ``AddRequest``/``AbortRequests``/``Shutdown`` and starts with
``Ready`` or ``StartupFailed``."""

from __future__ import annotations

import msgspec

from tessera.sampling_params import SamplingParams


class AddRequest(msgspec.Struct, frozen=True, tag=True):
    """A validated request. ``params`` travels whole; a sender whose side handles stop strings
    (the API process) sends it with ``stop`` cleared."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    """The text the ids came from, if the receiver's outputs should carry it."""


class AbortRequests(msgspec.Struct, frozen=True, tag=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    """Abort everything and exit."""


class Ready(msgspec.Struct, frozen=True, tag=True):
    """The process has loaded its part of the model; what its peer needs to know of it."""

    pid: int
    max_model_len: int = 0
    num_kv_blocks: int = 0
    """0 for a process that holds no KV (an FFN worker)."""
    vocab_size: int = 0
    warm_up_s: float = 0.0
    """How long the warm-up (which runs the largest step) took: a peer allows a step a
    multiple of this before it calls the process stalled."""
    worker: str = ""
    """The worker's name within its pool; empty for an engine core."""


class StartupFailed(msgspec.Struct, frozen=True, tag=True):
    message: str
    worker: str = ""
