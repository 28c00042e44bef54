"""``POST /v1/completions``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tessera.serve.errors import APIError
from tessera.serve.limits import check_limits
from tessera.serve.openai_models import CompletionRequest
from tessera.serve.prompts import check_prompt, completion_prompts, count_prompts
from tessera.serve.responses import (
    admitted,
    completion_logprobs,
    echo_logprobs,
    join_logprobs,
    new_id,
    prompt_logprobs_field,
    run_prompts,
    sse,
    stream_response,
    token_text,
    until_disconnect,
    usage,
)
from tessera.serve.state import ModelState
from tessera.serve.structured import check_constraint, requested_constraint


async def create_completion(
    body: CompletionRequest, request: Request, state: ModelState
) -> JSONResponse | StreamingResponse:
    if body.stream and body.prompt_logprobs:
        raise APIError(400, "prompt_logprobs are not available when stream is true",
                       param="prompt_logprobs")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of")
    check_limits(body, state.config, state.vocab_size)
    constraint, param = requested_constraint(body)
    await check_constraint(constraint, param)
    # Echo with logprobs shows the prompt's too (OpenAI's legacy behaviour); one engine
    # request computes what both need. A streamed prompt_logprobs=0 is accepted and unused,
    # as vLLM does.
    field_top = None if body.stream else body.prompt_logprobs
    echo_top = body.logprobs if body.echo else None
    wanted = [n for n in (field_top, echo_top) if n is not None]
    try:
        params = body.sampling_params(body.max_tokens, body.logprobs, constraint,
                                      max(wanted) if wanted else None)
    except ValueError as e:
        raise APIError(400, str(e)) from e
    num_seqs = params.n * count_prompts(body.prompt)
    # Before tokenizing: a full server refuses at once, without spending work on the prompt.
    state.check_capacity(num_seqs)
    prompts = await completion_prompts(body.prompt, state.tokenizer, state.max_prompt_chars)
    for ids in prompts:
        check_prompt(ids, state.max_model_len, state.vocab_size)
    echoes = _echo_texts(body.prompt, prompts, state.tokenizer) if body.echo else [""] * len(prompts)

    request_id = new_id("cmpl")
    created_s = int(time.time())
    model = state.name
    num_prompt_tokens = sum(len(p) for p in prompts)
    tok = state.tokenizer
    updates = admitted(state, num_seqs, run_prompts(state, request_id, prompts, params))
    header = {"id": request_id, "object": "text_completion", "created": created_s, "model": model}

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def chunks() -> AsyncIterator[bytes]:
            num_tokens = 0
            offsets = [0] * num_seqs
            # Each choice's first chunk starts with its echoed prompt (and its logprobs).
            unechoed = set(range(num_seqs)) if body.echo else set()
            async for i, u in updates:
                index = i * params.n + u.index
                text = u.text
                prompt_lps = None
                if index in unechoed:
                    unechoed.discard(index)
                    text = echoes[i] + text
                    offsets[index] = len(echoes[i])
                    if body.logprobs is not None and u.prompt_logprobs is not None:
                        prompt_lps = echo_logprobs(tok, prompts[i], u.prompt_logprobs,
                                                   body.logprobs)
                choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None}
                if body.logprobs is not None and u.logprobs:
                    choice["logprobs"] = completion_logprobs(
                        tok, u.token_ids, u.logprobs, body.logprobs, offsets[index]
                    )
                    if prompt_lps is not None:
                        choice["logprobs"] = join_logprobs(prompt_lps, choice["logprobs"])
                # Offsets count each token's own text, as the non-streamed response does (a
                # chunk's text may hold back a token's text, or release several at once).
                offsets[index] += sum(len(token_text(tok, t)) for t in u.token_ids)
                choice["finish_reason"] = u.finish_reason
                if body.return_token_ids:
                    choice["token_ids"] = u.token_ids
                num_tokens += len(u.token_ids)
                chunk = header | {"choices": [choice]}
                yield sse(chunk | {"usage": None} if include_usage else chunk)
            if include_usage:
                yield sse(header | {"choices": [], "usage": usage(num_prompt_tokens, num_tokens)})

        return stream_response(chunks())

    async def collect() -> dict[str, Any]:
        texts: dict[int, list[str]] = {}
        ids: dict[int, list[int]] = {}
        lps: dict[int, list[dict[int, float]]] = {}
        reasons: dict[int, str | None] = {}
        prompt_lps: dict[int, tuple[list[dict[int, float] | None], list[int | None]]] = {}
        async for i, u in updates:
            index = i * params.n + u.index
            if u.prompt_logprobs is not None and u.prompt_token_ranks is not None:
                prompt_lps[index] = (u.prompt_logprobs, u.prompt_token_ranks)
            texts.setdefault(index, []).append(u.text)
            ids.setdefault(index, []).extend(u.token_ids)
            lps.setdefault(index, []).extend(u.logprobs)
            reasons[index] = u.finish_reason
        choices = []
        for index in range(num_seqs):
            echo = echoes[index // params.n]
            prompt_ids = prompts[index // params.n]
            entries, ranks = prompt_lps.get(index, (None, None))
            choice: dict[str, Any] = {
                "index": index,
                "text": echo + "".join(texts.get(index, [])),
                "logprobs": None,
                "finish_reason": reasons.get(index),
            }
            if body.logprobs is not None:
                choice["logprobs"] = completion_logprobs(
                    tok, ids.get(index, []), lps.get(index, []), body.logprobs, len(echo)
                )
                if body.echo and entries is not None:
                    choice["logprobs"] = join_logprobs(
                        echo_logprobs(tok, prompt_ids, entries, body.logprobs),
                        choice["logprobs"])
            if body.prompt_logprobs is not None and entries is not None and ranks is not None:
                # vLLM's extra, per choice (each prompt of a request has its own).
                choice["prompt_logprobs"] = prompt_logprobs_field(
                    tok, prompt_ids, entries, ranks, body.prompt_logprobs)
            if body.return_token_ids:
                choice["token_ids"] = ids.get(index, [])
                choice["prompt_token_ids"] = prompts[index // params.n]
            choices.append(choice)
        num_tokens = sum(len(v) for v in ids.values())
        return header | {"choices": choices, "usage": usage(num_prompt_tokens, num_tokens)}

    return JSONResponse(await until_disconnect(request, collect))


def _echo_texts(
    prompt: str | list[str] | list[int] | list[list[int]], prompts: list[list[int]],
    tokenizer: Any,
) -> list[str]:
    """The text each prompt is echoed as: a text prompt as sent, token ids decoded."""
    one = isinstance(prompt, str) or all(isinstance(p, int) for p in prompt)
    items = [prompt] if one else list(prompt)
    texts = []
    for item, ids in zip(items, prompts, strict=True):
        if isinstance(item, str):
            texts.append(item)
        elif tokenizer is None:
            raise APIError(400, "echo of token ids needs the model's tokenizer", param="echo")
        else:
            texts.append(str(tokenizer.decode(ids)))
    return texts
