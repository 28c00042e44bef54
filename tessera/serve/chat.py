"""``POST /v1/chat/completions``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tessera.serve.chat_output import ChoiceShaper
from tessera.serve.errors import APIError
from tessera.serve.limits import check_limits
from tessera.serve.openai_models import ChatCompletionRequest
from tessera.serve.prompts import chat_prompt, check_prompt
from tessera.serve.responses import (
    admitted,
    chat_logprobs,
    new_id,
    prompt_logprobs_field,
    run_prompts,
    sse,
    stream_response,
    until_disconnect,
    usage,
)
from tessera.serve.state import ModelState
from tessera.serve.structured import check_constraint, requested_constraint
from tessera.serve.tool_calls import plan_tools, template_messages


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: ModelState
) -> JSONResponse | StreamingResponse:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    num_top = body.top_logprobs or 0
    if body.stream and body.prompt_logprobs:
        raise APIError(400, "prompt_logprobs are not available when stream is true",
                       param="prompt_logprobs")
    # A streamed prompt_logprobs=0 is accepted and unused, as vLLM does.
    prompt_top = None if body.stream else body.prompt_logprobs
    max_tokens = body.max_completion_tokens or body.max_tokens
    check_limits(body, state.config, state.vocab_size)
    plan = plan_tools(body, state.tool_parser_name)
    constraint, param = requested_constraint(body)
    if plan.constraint is not None:
        if constraint is not None:
            raise APIError(400, f"tool_choice {body.tool_choice!r} cannot be combined with "
                           f"{param}", param="tool_choice")
        constraint, param = plan.constraint, "tools"
    await check_constraint(constraint, param)
    # JSON from the first token leaves no room for reasoning; other grammars may hold it.
    reasoning = (state.reasoning_parser if constraint is None
                 or constraint.kind not in ("json", "json_object") else None)
    try:
        params = body.sampling_params(max_tokens, num_top if body.logprobs else None,
                                      constraint, prompt_top)
    except ValueError as e:
        raise APIError(400, str(e)) from e
    n = params.n
    # Before rendering and tokenizing: a full server refuses at once.
    state.check_capacity(n)
    prompt = await chat_prompt(body, state.tokenizer, state.max_prompt_chars, plan.tools,
                               template_messages(body))
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
            shapers = [ChoiceShaper(plan, reasoning) for _ in range(n)]
            for index in range(n):
                first = {"role": "assistant", "content": ""}
                choice = {"index": index, "delta": first, "logprobs": None, "finish_reason": None}
                yield sse(header | {"choices": [choice]} | extra)
            num_tokens = 0
            async for _, u in updates:
                shaper = shapers[u.index]
                deltas = shaper.feed(u.text) if u.text else []
                if u.finish_reason is not None:
                    deltas += shaper.finish()
                # One chunk per delta; the last carries the tokens, logprobs and finish reason.
                for delta in deltas[:-1]:
                    part = {"index": u.index, "delta": delta, "logprobs": None,
                            "finish_reason": None}
                    yield sse(header | {"choices": [part]} | extra)
                last = deltas[-1] if deltas else {}
                if not last and u.finish_reason is None and not (
                        body.logprobs or body.return_token_ids):
                    num_tokens += len(u.token_ids)
                    continue  # text held back (a stop string's or a parser's lookahead)
                choice = {"index": u.index, "delta": last, "logprobs": None}
                if body.logprobs and u.logprobs:
                    choice["logprobs"] = chat_logprobs(tok, u.token_ids, u.logprobs, num_top)
                choice["finish_reason"] = shaper.finish_reason(u.finish_reason)
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
        prompt_lps = None
        async for _, u in updates:
            if prompt_lps is None and u.prompt_logprobs is not None:
                prompt_lps = (u.prompt_logprobs, u.prompt_token_ranks or [])
            texts[u.index].append(u.text)
            ids[u.index].extend(u.token_ids)
            lps[u.index].extend(u.logprobs)
            reasons[u.index] = u.finish_reason
        choices = []
        for index in range(n):
            shaper = ChoiceShaper(plan, reasoning)
            shaper.feed("".join(texts[index]))
            shaper.finish()
            choice: dict[str, Any] = {
                "index": index,
                "message": shaper.message(),
                "logprobs": chat_logprobs(tok, ids[index], lps[index], num_top)
                if body.logprobs
                else None,
                "finish_reason": shaper.finish_reason(reasons[index]),
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
        if prompt_top is not None and prompt_lps is not None:
            # vLLM's extra, beside the choices: the prompt is the same for all of them.
            out["prompt_logprobs"] = prompt_logprobs_field(tok, prompt, *prompt_lps, prompt_top)
        return out

    return JSONResponse(await until_disconnect(request, collect))
