"""Requests held back until their grammar is compiled.

A constrained request's grammar compiles on the compiler's thread; the request joins the
scheduler only once it is ready, so the step loop never waits on a compile (a step with
nothing else to run waits briefly, then returns so new requests and aborts are taken).
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

from tessera.outputs import CompletionOutput, RequestOutput
from tessera.sampling_params import SamplingParams
from tessera.structured.compiler import GrammarCompiler

logger = logging.getLogger(__name__)

GRAMMAR_WAIT_S = 0.05
"""How long a step with nothing to run waits for a grammar being compiled."""


@dataclass
class HeldRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    compiled: Future[None]


class GrammarWaitlist:
    """The held-back requests of one engine, by id."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._held: dict[str, HeldRequest] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._held

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
             prompt: str | None) -> bool:
        """Start compiling ``params.structured`` (``GrammarError`` if it cannot compile at
        all); True if the request must wait for it, False if it may be admitted now."""
        assert params.structured is not None
        self.compiler.check(params.structured)
        compiled = self.compiler.submit(params.structured)
        if compiled.done():
            return False
        self._held[request_id] = HeldRequest(request_id, prompt_token_ids, params, prompt,
                                             compiled)
        return True

    def abort(self, request_id: str) -> bool:
        return self._held.pop(request_id, None) is not None

    def take_ready(self, idle: bool) -> tuple[list[HeldRequest], list[RequestOutput]]:
        """The held requests whose grammars are now compiled, and the finished (error)
        outputs of those whose grammar failed to compile. ``idle``: the engine has nothing
        else to run, so wait up to ``GRAMMAR_WAIT_S`` for a compile to finish."""
        if idle and self._held:
            wait([h.compiled for h in self._held.values()], GRAMMAR_WAIT_S, FIRST_COMPLETED)
        ready: list[HeldRequest] = []
        failed: list[RequestOutput] = []
        for request_id, held in list(self._held.items()):
            if not held.compiled.done():
                continue
            del self._held[request_id]
            error = held.compiled.exception()
            if error is None:
                ready.append(held)
                continue
            logger.warning("request %s: %s", request_id, error)
            failed.append(RequestOutput(
                request_id=request_id, prompt=held.prompt,
                prompt_token_ids=held.prompt_token_ids,
                outputs=[CompletionOutput(index=i, text="", token_ids=[], finish_reason="error",
                                          error=str(error)) for i in range(held.params.n)],
                finished=True))
        return ready, failed
