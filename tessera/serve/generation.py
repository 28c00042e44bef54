"""One request's life in the API process: send ids to the core, turn its tokens into text.

Detokenization and stop strings happen here, off the engine's step loop. When a completion
hits a stop string its text is cut there and, once no completion needs more tokens, the core is
told to abort the request, so its KV blocks are freed. A request whose consumer goes away (a
closed connection cancels the generator) is aborted the same way.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from tessera.engine.detokenizer import IncrementalDetokenizer, find_stop
from tessera.sampling_params import SamplingParams
from tessera.serve.engine_client import EngineClient, EngineDeadError, Finished
from tessera.serve.errors import APIError
from tessera.serve.metrics import ModelMetrics


@dataclass
class ChoiceUpdate:
    """What one completion gained since the last update (for a stream chunk)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]]
    finish_reason: str | None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """On the completion's first update, if requested: the engine's prompt entries."""
    prompt_token_ranks: list[int | None] | None = None


@dataclass
class ChoiceState:
    """Tokens and text of one completion so far."""

    index: int
    tokenizer: Any
    prompt_tail: list[int]
    stop: list[str]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    num_emitted_chars: int = 0
    finish_reason: str | None = None
    detok: IncrementalDetokenizer | None = None

    def __post_init__(self) -> None:
        # Prompt tail and tokens in one list that only grows: the detokenizer reads a short
        # window of it, so a token costs the same at any length (no copy per token).
        self.context_ids = list(self.prompt_tail)
        if self.tokenizer is not None:
            self.detok = IncrementalDetokenizer(self.tokenizer, self.prompt_tail)
        # A stop string may straddle two chunks: hold back text that could be its start.
        self.holdback_chars = max((len(s) for s in self.stop), default=1) - 1

    def feed(
        self, token_id: int, logprobs: dict[int, float] | None, finish_reason: str | None
    ) -> ChoiceUpdate:
        self.token_ids.append(token_id)
        self.context_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        detok = self.detok
        if detok is not None:
            delta = detok.step(self.context_ids)
            cut = find_stop(detok.text, len(delta), self.stop) if delta and self.stop else -1
            if cut != -1:
                self.text = detok.text[:cut]
                finish_reason = "stop"
            elif finish_reason is not None:
                # The same text LLM.generate returns (flushes a trailing partial character).
                self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            else:
                self.text = detok.text
        return self._update(1, finish_reason)

    def finish(self, reason: str) -> ChoiceUpdate:
        """End the completion outside the core (shutdown): release held-back text."""
        return self._update(0, reason)

    def _update(self, num_new_tokens: int, finish_reason: str | None) -> ChoiceUpdate:
        self.finish_reason = finish_reason
        end = len(self.text)
        if finish_reason is None:
            end = max(self.num_emitted_chars, end - self.holdback_chars)
        text = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        new_ids = self.token_ids[len(self.token_ids) - num_new_tokens :]
        new_lps = self.logprobs[len(self.logprobs) - num_new_tokens :] if self.logprobs else []
        return ChoiceUpdate(self.index, text, new_ids, new_lps, finish_reason)


async def generate(
    client: EngineClient,
    metrics: ModelMetrics,
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    tokenizer: Any,
) -> AsyncIterator[list[ChoiceUpdate]]:
    """Yield each step's updates until every completion has finished.

    Raises ``APIError`` (500) if the engine core dies, or (400) if it refuses the request.
    """
    arrival_s = time.monotonic()
    first_token_s: float | None = None
    stop = list(params.stop or [])
    choices = [ChoiceState(i, tokenizer, prompt_token_ids[-6:], stop) for i in range(params.n)]
    try:
        # Stop strings are checked here, on the text: the core never sees them.
        queue = client.add_request(request_id, prompt_token_ids, replace(params, stop=None))
    except EngineDeadError as e:
        raise APIError(503, str(e), headers={"Retry-After": "5"}) from None
    num_core_finished = 0
    core_gone = False
    try:
        while any(c.finish_reason is None for c in choices):
            event = await queue.get()
            if isinstance(event, Finished):
                core_gone = True
                if event.reason == "error":
                    raise APIError(event.status_code, event.error or "request failed")
                yield [c.finish(event.reason) for c in choices if c.finish_reason is None]
                return
            updates = []
            for d in event:
                num_core_finished += d.finish_reason is not None
                choice = choices[d.index]
                if choice.finish_reason is None:
                    update = choice.feed(d.token_id, d.logprobs, d.finish_reason)
                    update.prompt_logprobs = d.prompt_logprobs
                    update.prompt_token_ranks = d.prompt_token_ranks
                    updates.append(update)
            if first_token_s is None:
                first_token_s = time.monotonic()
            yield updates
        num_tokens = max(len(c.token_ids) for c in choices)
        metrics.observe_request(arrival_s, first_token_s or arrival_s, num_tokens)
    finally:
        # Stop strings, a closed connection, or a cancelled task: free the core's blocks now.
        client.release(request_id, abort=not core_gone and num_core_finished < params.n)
