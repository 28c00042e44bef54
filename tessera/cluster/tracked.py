"""What the cluster front keeps of each request, and the outputs it makes from it when an
instance cannot: a request continued elsewhere, or one that ends with an error."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tessera.outputs import CompletionOutput, RequestOutput
from tessera.sampling_params import SamplingParams


@dataclass
class Tracked:
    """A request as the front tracks it: where it runs and its tokens so far."""

    instance: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    output_ids: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[dict[int, float]]] = field(default_factory=dict)
    """By completion index, when requested."""
    phase: str = "both"
    """Where it runs: ``prefill`` (its first token, on a prefill instance), then ``decode``;
    or ``both`` (whole, on one instance)."""
    sent_params: SamplingParams | None = None
    """The params its current instance was given."""
    num_retries: int = 0
    num_resumed_tokens: int = 0
    """Tokens of completion 0 generated on earlier instances (a continued request)."""




def continuation(tracked: Tracked, max_model_len: int) -> tuple[list[int], SamplingParams] | str:
    """The prompt and params that carry ``tracked`` on from its tokens so far on another
    instance, or why it cannot be: several completions, a grammar or prompt logprobs would
    lose their state (a request with no tokens yet is simply sent again)."""
    produced = sum(len(ids) for ids in tracked.output_ids.values())
    params = tracked.params
    ids = tracked.prompt_token_ids + tracked.output_ids.get(0, [])
    if not produced:
        return ids, params
    if params.n > 1 or params.structured is not None or params.prompt_logprobs is not None:
        return "its tokens so far cannot be continued elsewhere"
    if len(ids) >= max_model_len:
        return "no room left to continue it"
    if params.max_tokens is not None:
        params = replace(params, max_tokens=params.max_tokens - produced)
    return ids, params


def merged_output(out: RequestOutput, tracked: Tracked, tokenizer: Any | None) -> RequestOutput:
    """The request's output as the client asked for it: its prompt (an instance is sent ids
    only) and, for a continued request, the tokens generated before it moved (its instance
    saw them as prompt)."""
    if not tracked.num_resumed_tokens:
        return replace(out, prompt=tracked.prompt)
    (c,) = out.outputs
    n = tracked.num_resumed_tokens
    earlier = tracked.output_ids[0][:n]
    prefix = tokenizer.decode(earlier, skip_special_tokens=True) if tokenizer else ""
    ids = earlier + c.token_ids
    logprobs = cumulative = None
    if c.logprobs is not None:
        logprobs = tracked.logprobs.get(0, [])[:n] + c.logprobs
        cumulative = sum(lp.get(t, 0.0) for t, lp in zip(ids, logprobs, strict=False))
    whole = CompletionOutput(0, prefix + c.text, ids, c.finish_reason, logprobs, cumulative,
                             c.error)
    return RequestOutput(out.request_id, tracked.prompt, tracked.prompt_token_ids, [whole], True)


def error_output(request_id: str, tracked: Tracked, message: str,
                 tokenizer: Any | None) -> RequestOutput:
    """Every completion of ``tracked`` ended with ``message``, its tokens so far kept."""
    outputs = []
    for index in range(tracked.params.n):
        ids = tracked.output_ids.get(index, [])
        text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer else ""
        outputs.append(CompletionOutput(index, text, ids, "error", error=message))
    return RequestOutput(request_id, tracked.prompt, tracked.prompt_token_ids, outputs, True)
