"""The engine's requests: admission, per-step post-processing and outputs.

A ``RequestTable`` owns every unfinished request and turns the tokens a step sampled into
deltas and finished outputs. It never decides what runs (the scheduler does) and never touches
the device (the runner does): each call names the scheduler whose sequences it acts on, so one
table can serve one scheduler (``LLMEngine``) or several over one KV pool (an attention
worker's lanes).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from tessera.config import RuntimeInfo
from tessera.engine.detokenizer import IncrementalDetokenizer, find_stop
from tessera.engine.prompt_logprobs import PromptLogprobsChunk
from tessera.engine.sampler import Sampler
from tessera.engine.scheduler import Scheduler, SchedulerOutput
from tessera.engine.sequence import Sequence, check_logit_bias, check_prompt_ids
from tessera.outputs import CompletionOutput, RequestOutput, StepOutput, TokenDelta
from tessera.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

STEP_FAILED_MESSAGE = "the engine failed while running this request (see the server log)"
"""The error of a request whose step raised; the traceback goes to the log, not the client."""


@dataclass
class Request:
    """One prompt and its ``params.n`` completions (one ``Sequence`` each)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer | None] = field(default_factory=list)
    stop_texts: dict[int, str] = field(default_factory=dict)
    """Text of a completion cut at its stop string, by completion index."""

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class RequestTable:
    """Unfinished requests by id, and the token counters of all requests ever admitted."""

    def __init__(self, runtime: RuntimeInfo, sampler: Sampler, tokenizer: Any | None) -> None:
        """``tokenizer`` (None: token ids only) detokenizes for stop strings and outputs."""
        self.runtime = runtime
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.requests: dict[str, Request] = {}
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    def __len__(self) -> int:
        return len(self.requests)

    # ----------------------------------------------------------------- admission
    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
            scheduler: Scheduler, prompt: str | None = None) -> None:
        """Admit a request and queue its sequences on ``scheduler``; ValueError for a bad
        prompt or an id already in use. ``prompt`` is the text the ids came from, if any."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = list(prompt_token_ids)
        self.check(ids, params)
        now = time.monotonic()
        seqs = [Sequence(request_id, ids, params, index=i, arrival_s=now) for i in range(params.n)]
        detoks: list[IncrementalDetokenizer | None] = [
            IncrementalDetokenizer(self.tokenizer, ids)
            if params.stop and self.tokenizer is not None
            else None
            for _ in seqs
        ]
        self.requests[request_id] = Request(request_id, prompt, ids, params, seqs, detoks)
        for seq in seqs:
            scheduler.add(seq)
        self.num_prompt_tokens_total += len(ids)

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """ValueError if the prompt or params cannot run on this engine."""
        check_prompt_ids(prompt_token_ids, self.runtime.vocab_size, self.runtime.max_model_len)
        check_logit_bias(params.logit_bias, self.runtime.vocab_size)
        if params.structured is not None and self.sampler.grammars is None:
            raise ValueError("structured outputs need the model's tokenizer, which it lacks")

    def abort(self, request_id: str, scheduler: Scheduler) -> bool:
        """End a request at once and free its KV blocks; False if it is unknown or done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            self._finish(seq, "abort", scheduler)
        return True

    def _finish(self, seq: Sequence, reason: str, scheduler: Scheduler) -> None:
        scheduler.finish(seq, reason)
        self.sampler.release(seq)

    # ----------------------------------------------------------------- after a step
    def fail(self, out: SchedulerOutput, scheduler: Scheduler) -> StepOutput:
        """Contain a step that raised: its requests end with ``finish_reason="error"`` and
        free their blocks; every other request goes on. The step's KV writes only touched
        blocks not yet published to the prefix cache (``Scheduler.update`` publishes them),
        so freeing them leaves no wrong KV behind."""
        logger.exception("an engine step of %d sequences failed", len(out.seqs))
        result = StepOutput()
        for request_id in dict.fromkeys(seq.request_id for seq in out.seqs):
            req = self.requests.pop(request_id, None)
            if req is None:
                continue
            for seq in req.seqs:
                self._finish(seq, "error", scheduler)
            output = self._make_output(req)
            for completion in output.outputs:
                if completion.finish_reason == "error":
                    completion.error = STEP_FAILED_MESSAGE
            result.finished.append(output)
        return result

    def postprocess(self, out: SchedulerOutput, tokens: list[int | None],
                    logprobs: list[dict[int, float] | None], scheduler: Scheduler,
                    prompt_logprobs: list[PromptLogprobsChunk | None] | None = None,
                    num_accepted: list[int] | None = None) -> StepOutput:
        """Take the tokens sampled for ``out`` (which ``scheduler`` scheduled and has updated:
        each sequence's new tokens, ``num_accepted[i]`` accepted draft tokens and then
        ``tokens[i]``, are its last ones) and the prompt logprobs its chunks gave; finish what
        stopped and say what changed. A completion that stops at one of its new tokens drops
        the ones after it."""
        result = StepOutput()
        if prompt_logprobs is not None:
            for seq, chunk in zip(out.seqs, prompt_logprobs, strict=True):
                if chunk is not None:
                    _add_prompt_logprobs(seq, chunk)
        for i, (seq, token, lp) in enumerate(zip(out.seqs, tokens, logprobs, strict=True)):
            if token is None or seq.is_finished:
                continue
            num_new = 1 + (num_accepted[i] if num_accepted is not None else 0)
            first = seq.num_tokens - num_new
            for pos in range(first, seq.num_tokens):
                # Only the last new token has a logprobs entry (drafted requests have none).
                if self._take_token(seq, seq.token_ids[pos], lp if pos == seq.num_tokens - 1
                                    else None, result, scheduler, pos + 1):
                    break
        return result

    def _take_token(self, seq: Sequence, token: int, lp: dict[int, float] | None,
                    result: StepOutput, scheduler: Scheduler, num_tokens: int) -> bool:
        """Report ``seq``'s token at position ``num_tokens - 1`` and finish ``seq`` if it stops
        there (dropping the tokens after it); returns whether it did."""
        self.num_generation_tokens_total += 1
        p = seq.params
        num_output = num_tokens - seq.num_prompt_tokens
        if seq.logprobs is not None and lp is not None:
            seq.logprobs.append(lp)
            seq.cumulative_logprob += lp[token]
        req = self.requests[seq.request_id]
        reason = None
        if (not p.ignore_eos and token in self.runtime.eos_token_ids) or token in p.stop_set:
            reason = "stop"
        else:
            detok = req.detokenizers[seq.index]
            if detok is not None and p.stop:
                delta = detok.step(seq.token_ids, num_tokens)
                cut = find_stop(detok.text, len(delta), p.stop) if delta else -1
                if cut != -1:
                    req.stop_texts[seq.index] = detok.text[:cut]
                    reason = "stop"
        if reason is None and (
            (p.max_tokens is not None and num_output >= p.max_tokens)
            or num_tokens >= self.runtime.max_model_len
        ):
            reason = "length"
        step_delta = TokenDelta(seq.request_id, seq.index, token, lp, reason)
        if seq.prompt_logprobs is not None and num_output == 1:
            # The prompt ended in this step: its logprobs are whole now.
            step_delta.prompt_logprobs = seq.prompt_logprobs
            step_delta.prompt_token_ranks = seq.prompt_token_ranks
        result.deltas.append(step_delta)
        if reason is None:
            return False
        del seq.token_ids[num_tokens:]
        self._finish(seq, reason, scheduler)
        if req.finished:
            result.finished.append(self._make_output(req))
            del self.requests[req.request_id]
        return True

    def _make_output(self, req: Request) -> RequestOutput:
        first = req.seqs[0]
        outputs = []
        for seq in req.seqs:
            ids = seq.output_token_ids
            text = req.stop_texts.get(seq.index)
            if text is None:
                text = (self.tokenizer.decode(ids, skip_special_tokens=True)
                        if self.tokenizer is not None else "")
            outputs.append(CompletionOutput(
                index=seq.index,
                text=text,
                token_ids=ids,
                finish_reason=seq.finish_reason,
                logprobs=seq.logprobs,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            ))
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outputs,
            finished=True,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
            # Complete once the prompt ran in full (not for a request aborted before that).
            prompt_logprobs=None if first.needs_prompt_logprobs else first.prompt_logprobs,
            prompt_token_ranks=None if first.needs_prompt_logprobs else first.prompt_token_ranks,
        )


def _add_prompt_logprobs(seq: Sequence, chunk: PromptLogprobsChunk) -> None:
    """Append a step's prompt entries to ``seq``'s (the runner planned exactly the tokens
    after those it has, so the chunk continues them)."""
    assert seq.prompt_logprobs is not None and seq.prompt_token_ranks is not None
    assert chunk.first_token == len(seq.prompt_logprobs), "prompt logprobs out of order"
    seq.prompt_logprobs.extend(chunk.entries)
    seq.prompt_token_ranks.extend(chunk.ranks)
