"""What generate() returns: one RequestOutput per prompt, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One completion of a prompt.

    ``logprobs`` is None unless requested; otherwise one dict per generated token mapping token
    id to log-probability, holding the sampled token and the top-N alternatives.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """All completions of one prompt, in the order of ``CompletionOutput.index``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
