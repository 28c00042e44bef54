"""``POST /v1/chat/completions``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tessera.serve.errors import APIError
from tessera.serve.limits import check_limits
from tessera.serve.openai_models import ChatCompletionRequest
from tessera.serve.prompts import chat_prompt, check_prompt
from tessera.serve.responses import (
    admitted,
    chat_logprobs,
    new_id,
    run_prompts,
    sse,
    stream_response,
    until_disconnect,
    usage,
)
from tessera.serve.state import ModelState


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: ModelState
) -> JSONResponse | StreamingResponse:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    num_top = body.top_logprobs or 0
    max_tokens = body.max_completion_tokens or body.max_tokens
    check_limits(body, state.config, state.vocab_size)
    try:
        params = body.sampling_params(max_tokens, num_top if body.logprobs else None)
    except ValueError as e:
        raise APIError(400, str(e)) from e
    n = params.n
    # Before rendering and tokenizing: a full server refuses at once.
    state.check_capacity(n)
    prompt = await chat_prompt(body, state.tokenizer, state.max_prompt_chars)
    check_prompt(prompt, state.max_model_len, state.vocab_size)

    request_id = new_id("chatcmpl")
    created_s = int(time.time())
    model = state.name
    tok = state.tokenizer
    updates = admitted(state, n, run_prompts(state, request_id, [prompt], params))
    header = {
        "id": request_id,
        "object": "chat.completion.chunk" if body.stream else "chat.completion",
        "created": created_s,
        "model": model,
    }

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        extra = {"usage": None} if include_usage else {}

        async def chunks() -> AsyncIterator[bytes]:
            for index in range(n):
                first = {"role": "assistant", "content": ""}
                choice = {"index": index, "delta": first, "logprobs": None, "finish_reason": None}
                yield sse(header | {"choices": [choice]} | extra)
            num_tokens = 0
            async for _, u in updates:
                delta = {"content": u.text} if u.text or u.finish_reason is None else {}
                choice = {"index": u.index, "delta": delta, "logprobs": None}
                if body.logprobs and u.logprobs:
                    choice["logprobs"] = chat_logprobs(tok, u.token_ids, u.logprobs, num_top)
                choice["finish_reason"] = u.finish_reason
                if body.return_token_ids:
                    choice["token_ids"] = u.token_ids
                num_tokens += len(u.token_ids)
                yield sse(header | {"choices": [choice]} | extra)
            if include_usage:
                yield sse(header | {"choices": [], "usage": usage(len(prompt), num_tokens)})

        return stream_response(chunks())

    async def collect() -> dict[str, Any]:
        texts: list[list[str]] = [[] for _ in range(n)]
        ids: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[dict[int, float]]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        async for _, u in updates:
            texts[u.index].append(u.text)
            ids[u.index].extend(u.token_ids)
            lps[u.index].extend(u.logprobs)
            reasons[u.index] = u.finish_reason
        choices = []
        for index in range(n):
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": "".join(texts[index])},
                "logprobs": chat_logprobs(tok, ids[index], lps[index], num_top)
                if body.logprobs
                else None,
                "finish_reason": reasons[index],
            }
            if body.return_token_ids:
                choice["token_ids"] = ids[index]
            choices.append(choice)
        num_tokens = sum(len(i) for i in ids)
        out: dict[str, Any] = header | {
            "choices": choices,
            "usage": usage(len(prompt), num_tokens),
        }
        if body.return_token_ids:
            out["prompt_token_ids"] = prompt
        return out

    return JSONResponse(await until_disconnect(request, collect))
