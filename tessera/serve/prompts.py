"""Turning request bodies into prompt token ids (tokenizer and chat template), with checks.

Rendering the chat template and tokenizing run on a small thread pool, never on the event
loop: a long prompt takes milliseconds to seconds to tokenize, and the loop must keep serving
``/health`` and every other stream meanwhile. Text is bounded (``max_prompt_chars``) before
it is tokenized, and a rendered chat again after rendering. Only the server's own chat
template is ever rendered: ``chat_template_kwargs`` may set variables that template reads, and
nothing else (no template, no tools, no tokenizer arguments).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any, TypeVar

from tessera.engine.sequence import check_prompt_ids
from tessera.serve.errors import APIError
from tessera.serve.openai_models import ChatCompletionRequest

T = TypeVar("T")

_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tessera-prompt")
"""Threads that render and tokenize. Tokenizers release the GIL while encoding, so a few
threads tokenize in parallel; jinja holds it but yields every few milliseconds."""

_TEMPLATE_NAMES = frozenset({
    "messages", "conversation", "chat_template", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "raise_exception", "strftime_now",
})  # fmt: skip
"""Names a request may not set: what the server passes the template itself, and the helper
functions transformers gives it."""


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the prompt pool."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, fn, *args)


def _require_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None:
        raise APIError(
            400, "this model has no tokenizer; send prompts as token ids", param="prompt"
        )
    return tokenizer


def _too_long(what: str, num_chars: int, max_chars: int, param: str) -> APIError:
    return APIError(
        400,
        f"the {what} has {num_chars} characters; this server takes at most {max_chars} "
        "(more cannot fit the model's context)",
        param=param,
    )


def _encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    except Exception as e:  # the tokenizers library raises TypeError, ValueError, ...
        raise APIError(400, "the prompt cannot be tokenized", param="prompt") from e


def count_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    """How many prompts a completions ``prompt`` holds (one for a string or one id list)."""
    if isinstance(prompt, str) or not prompt or all(isinstance(p, int) for p in prompt):
        return 1
    return len(prompt)


async def completion_prompts(
    prompt: str | list[str] | list[int] | list[list[int]], tokenizer: Any, max_chars: int
) -> list[list[int]]:
    """Token ids of each prompt of a completions request (a string, strings or ids)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    elif all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    texts = [p for p in prompt if isinstance(p, str)]
    if texts:
        _require_tokenizer(tokenizer)
        for text in texts:
            if len(text) > max_chars:
                raise _too_long("prompt", len(text), max_chars, "prompt")

    def tokenize() -> list[list[int]]:
        return [
            _encode(tokenizer, p) if isinstance(p, str) else list(p)  # type: ignore[arg-type]
            for p in prompt
        ]

    return await off_loop(tokenize) if texts else tokenize()


async def tokenize_text(
    text: str, tokenizer: Any, max_chars: int, add_special_tokens: bool = True
) -> list[int]:
    """Token ids of one text (``/tokenize``), bounded like a completions prompt."""
    _require_tokenizer(tokenizer)
    if len(text) > max_chars:
        raise _too_long("prompt", len(text), max_chars, "prompt")
    return await off_loop(_encode, tokenizer, text, add_special_tokens)


def _message_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def server_template(tokenizer: Any) -> str | None:
    """The chat template the server renders: the tokenizer's, or the one named "default" of a
    tokenizer that ships several (which ``apply_chat_template`` picks too)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def _apply_chat_template_params(tokenizer: Any) -> frozenset[str]:
    params = inspect.signature(tokenizer.apply_chat_template).parameters
    return frozenset(name for name, p in params.items() if p.kind is not p.VAR_KEYWORD)


@cache
def _template_variables(template: str) -> frozenset[str]:
    """The variables the template reads (jinja's undeclared names)."""
    import jinja2
    import jinja2.meta

    return frozenset(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)))


def _all_finite(value: Any) -> bool:
    """No NaN or infinity anywhere in a parsed JSON value (1e999 parses as infinity)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def template_kwargs(kwargs: dict[str, Any] | None, tokenizer: Any) -> dict[str, Any]:
    """The ``chat_template_kwargs`` that reach the template.

    A name the server sets itself, an argument of ``apply_chat_template`` (``chat_template``,
    ``tokenize``, ...) or a special token is refused (400); a variable the model's template
    does not read is dropped, as it would change nothing (clients send e.g.
    ``enable_thinking`` to every model).
    """
    if not kwargs:
        return {}
    template = server_template(tokenizer)
    if template is None:
        return {}
    names = _template_variables(template)
    reserved = (
        _TEMPLATE_NAMES
        | _apply_chat_template_params(tokenizer)
        | set(getattr(tokenizer, "special_tokens_map", {}))
    )
    for key, value in kwargs.items():
        if key in reserved or key.startswith("_"):
            raise APIError(
                400,
                f"chat_template_kwargs may not set {key!r}: only variables of the model's own "
                "chat template can be set",
                param="chat_template_kwargs",
            )
        if not _all_finite(value):
            raise APIError(
                400, f"chat_template_kwargs.{key} holds a number that is not finite",
                param="chat_template_kwargs",
            )
    return {k: v for k, v in kwargs.items() if k in names}


async def chat_prompt(
    request: ChatCompletionRequest, tokenizer: Any, max_chars: int,
    tools: list[dict[str, Any]] | None = None,
    message_extras: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of the chat rendered with the tokenizer's chat template, with ``tools`` (the
    template's ``tools`` variable) and per-message ``message_extras`` (tool calls and ids)."""
    tok = _require_tokenizer(tokenizer)
    if server_template(tok) is None:
        raise APIError(
            400,
            "this model has no chat template (tokenizer_config.json has no chat_template); "
            "use /v1/completions",
            param="messages",
        )
    extras = message_extras or [{} for _ in request.messages]
    messages = [
        {"role": m.role, "content": _message_text(m.content)}
        | ({"name": m.name} if m.name else {}) | extra
        for m, extra in zip(request.messages, extras, strict=True)
    ]
    num_chars = sum(len(m["content"]) + len(m["role"]) for m in messages)
    if num_chars > max_chars:
        raise _too_long("conversation", num_chars, max_chars, "messages")
    extra = template_kwargs(request.chat_template_kwargs, tok)
    if tools:
        num_chars += len(json.dumps(tools))
        if num_chars > max_chars:
            raise _too_long("conversation", num_chars, max_chars, "tools")
        extra["tools"] = tools

    def render_and_tokenize() -> list[int]:
        import jinja2

        try:
            text = tok.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=request.add_generation_prompt,
                **extra,
            )
        except jinja2.TemplateError as e:  # the template's own message for a bad conversation
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from e
        except Exception as e:
            raise APIError(400, "cannot apply the chat template", param="messages") from e
        if len(text) > max_chars:
            raise _too_long("rendered conversation", len(text), max_chars, "messages")
        # The template already holds any special tokens (BOS); adding them again doubles them.
        return _encode(tok, text, add_special_tokens=False)

    return await off_loop(render_and_tokenize)


def check_prompt(ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """The engine's own prompt checks, made before the request is sent (400, not 500)."""
    try:
        check_prompt_ids(ids, vocab_size, max_model_len)
    except ValueError as e:
        raise APIError(400, str(e), param="prompt") from None
