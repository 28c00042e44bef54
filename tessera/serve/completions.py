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
    new_id,
    run_prompts,
    sse,
    stream_response,
    until_disconnect,
    usage,
)
from tessera.serve.state import ModelState
from tessera.serve.structured import check_constraint, requested_constraint


async def create_completion(
    body: CompletionRequest, request: Request, state: ModelState
) -> JSONResponse | StreamingResponse:
    if body.echo and body.logprobs is not None:
        raise APIError(
            400, "echo with logprobs is not supported yet (it needs the prompt's logprobs); "
            "echo without logprobs is", param="echo",
        )
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of")
    check_limits(body, state.config, state.vocab_size)
    constraint, param = requested_constraint(body)
    await check_constraint(constraint, param)
    try:
        params = body.sampling_params(body.max_tokens, body.logprobs, constraint)
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
            # Each choice's first chunk starts with its echoed prompt.
            unechoed = set(range(num_seqs)) if body.echo else set()
            async for i, u in updates:
                index = i * params.n + u.index
                text = u.text
                if index in unechoed:
                    unechoed.discard(index)
                    text = echoes[i] + text
                choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None}
                if body.logprobs is not None and u.logprobs:
                    choice["logprobs"] = completion_logprobs(
                        tok, u.token_ids, u.logprobs, body.logprobs, offsets[index]
                    )
                offsets[index] += len(u.text)
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
        async for i, u in updates:
            index = i * params.n + u.index
            texts.setdefault(index, []).append(u.text)
            ids.setdefault(index, []).extend(u.token_ids)
            lps.setdefault(index, []).extend(u.logprobs)
            reasons[index] = u.finish_reason
        choices = []
        for index in range(num_seqs):
            choice: dict[str, Any] = {
                "index": index,
                "text": echoes[index // params.n] + "".join(texts.get(index, [])),
                "logprobs": None,
                "finish_reason": reasons.get(index),
            }
            if body.logprobs is not None:
                choice["logprobs"] = completion_logprobs(
                    tok, ids.get(index, []), lps.get(index, []), body.logprobs, 0
                )
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
