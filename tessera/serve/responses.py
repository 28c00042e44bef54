"""What both OpenAI endpoints share: running prompts, SSE framing, logprobs and usage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from fastapi import Request
from fastapi.responses import StreamingResponse

from tessera.sampling_params import SamplingParams
from tessera.serve.errors import APIError, error_body, internal_error_message
from tessera.serve.generation import ChoiceUpdate, generate
from tessera.serve.state import ModelState

_DISCONNECT_POLL_S = 0.5

Updates = AsyncIterator[tuple[int, ChoiceUpdate]]
"""(prompt index, update) pairs of every prompt of a request."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else msgspec.json.encode(payload).decode()
    return f"data: {data}\n\n".encode()


async def run_prompts(
    state: ModelState, request_id: str, prompts: list[list[int]], params: SamplingParams
) -> Updates:
    """Generate for every prompt at once and yield their updates as they come.

    Cancelling the consumer cancels every prompt's task, whose generators then abort their
    core requests (see ``generate``).
    """
    gens = [
        generate(state.client, state.metrics, f"{request_id}-{i}", ids, params, state.tokenizer)
        for i, ids in enumerate(prompts)
    ]
    if len(gens) == 1:
        async for updates in gens[0]:
            for u in updates:
                yield 0, u
        return
    queue: asyncio.Queue[tuple[int, list[ChoiceUpdate]] | BaseException | None] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for updates in gens[i]:
                queue.put_nowait((i, updates))
            queue.put_nowait(None)
        except Exception as e:
            queue.put_nowait(e)

    tasks = [asyncio.create_task(pump(i)) for i in range(len(gens))]
    try:
        num_done = 0
        while num_done < len(tasks):
            item = await queue.get()
            if item is None:
                num_done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                for u in item[1]:
                    yield item[0], u
    finally:
        for task in tasks:
            task.cancel()


async def admitted(state: ModelState, num_seqs: int, updates: Updates) -> Updates:
    """``updates`` counted against the server's queue limit from their start to their end.

    Handlers call ``state.check_capacity`` first, so a full queue is a 503 status, not an
    error event; counting starts here so a response that never starts holds no slot.
    """
    state.admit(num_seqs)
    try:
        async for item in updates:
            yield item
    finally:
        state.leave(num_seqs)


async def until_disconnect(request: Request, work: Callable[[], Any]) -> Any:
    """Await ``work()`` but cancel it (aborting its requests) if the client goes away."""
    task = asyncio.create_task(work())
    while True:
        done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise APIError(400, "the client disconnected")


def stream_response(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    """An SSE response; an error after the first byte is sent as a final error event, and
    every stream ends with ``[DONE]``. An unexpected error is logged with its traceback and
    shown to the client without its text (which may hold internals)."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as e:
            yield sse(error_body(e.status_code, e.message, e.param, e.code))
        except Exception as e:
            yield sse(error_body(500, internal_error_message(e)))
        yield sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream")


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }


def token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return str(tokenizer.decode([token_id]))


def top_entries(entry: dict[int, float], num_top: int) -> list[tuple[int, float]]:
    """The ``num_top`` most likely tokens of an engine logprobs entry, best first."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:num_top]


def completion_logprobs(
    tokenizer: Any,
    token_ids: list[int],
    entries: list[dict[int, float]],
    num_top: int,
    text_offset: int,
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for these tokens."""
    tokens = [token_text(tokenizer, t) for t in token_ids]
    offsets = []
    for tok in tokens:
        offsets.append(text_offset)
        text_offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [e[t] for t, e in zip(token_ids, entries, strict=True)],
        "top_logprobs": [
            {token_text(tokenizer, t): v for t, v in top_entries(e, num_top)} for e in entries
        ],
        "text_offset": offsets,
    }


def chat_logprobs(
    tokenizer: Any, token_ids: list[int], entries: list[dict[int, float]], num_top: int
) -> dict[str, Any]:
    """The chat ``logprobs`` object (``content`` list) for these tokens."""

    def item(t: int, v: float) -> dict[str, Any]:
        text = token_text(tokenizer, t)
        return {"token": text, "logprob": v, "bytes": list(text.encode())}

    return {
        "content": [
            item(t, e[t]) | {"top_logprobs": [item(a, v) for a, v in top_entries(e, num_top)]}
            for t, e in zip(token_ids, entries, strict=True)
        ]
    }


def prompt_logprobs_field(
    tokenizer: Any,
    prompt_ids: list[int],
    entries: list[dict[int, float] | None],
    ranks: list[int | None],
    num_top: int,
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt position null (the first) or the prompt token
    and the ``num_top`` most likely, by token id: ``{"logprob", "rank", "decoded_token"}``."""
    result: list[dict[str, dict[str, Any]] | None] = []
    for token, entry, rank in zip(prompt_ids, entries, ranks, strict=True):
        if entry is None or rank is None:
            result.append(None)
            continue
        # The engine's entry may hold more alternatives than this field asks (echo's
        # logprobs may ask more): the top ones are taken by value.
        items = {token: (entry[token], rank)}
        for i, (t, v) in enumerate(top_entries(entry, num_top)):
            items.setdefault(t, (v, i + 1))
        result.append({
            str(t): {"logprob": v, "rank": r, "decoded_token": token_text(tokenizer, t)}
            for t, (v, r) in items.items()
        })
    return result


def echo_logprobs(
    tokenizer: Any,
    prompt_ids: list[int],
    entries: list[dict[int, float] | None],
    num_top: int,
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` of an echoed prompt: null for its first token,
    which nothing predicts; offsets from the start of the text."""
    # The first token's placeholder entry only keeps the lists aligned; it is nulled below.
    lps = completion_logprobs(tokenizer, prompt_ids, [e or {t: 0.0} for t, e in
                                                       zip(prompt_ids, entries, strict=True)],
                              num_top, 0)
    lps["token_logprobs"][0] = None
    lps["top_logprobs"][0] = None
    return lps


def join_logprobs(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two legacy ``logprobs`` objects as one (the echoed prompt's, then the generated)."""
    return {key: first[key] + second[key] for key in first}
