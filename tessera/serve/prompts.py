"""Turning request bodies into prompt token ids (tokenizer and chat template), with checks."""

from __future__ import annotations

from typing import Any

from tessera.serve.errors import APIError
from tessera.serve.openai_models import ChatCompletionRequest


def _require_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None:
        raise APIError(
            400, "this model has no tokenizer; send prompts as token ids", param="prompt"
        )
    return tokenizer


def completion_prompts(
    prompt: str | list[str] | list[int] | list[list[int]], tokenizer: Any
) -> list[list[int]]:
    """Token ids of each prompt of a completions request (a string, strings or ids)."""
    if isinstance(prompt, str):
        return [list(_require_tokenizer(tokenizer).encode(prompt))]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    result = []
    for p in prompt:
        if isinstance(p, str):
            result.append(list(_require_tokenizer(tokenizer).encode(p)))
        else:
            result.append(list(p))  # type: ignore[arg-type]
    return result


def _message_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def chat_prompt(request: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    """Token ids of the chat rendered with the tokenizer's chat template."""
    tok = _require_tokenizer(tokenizer)
    if not getattr(tok, "chat_template", None):
        raise APIError(
            400,
            "this model has no chat template (tokenizer_config.json has no chat_template); "
            "use /v1/completions",
            param="messages",
        )
    messages = [
        {"role": m.role, "content": _message_text(m.content)} | ({"name": m.name} if m.name else {})
        for m in request.messages
    ]
    try:
        text = tok.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=request.add_generation_prompt,
            **(request.chat_template_kwargs or {}),
        )
    except Exception as e:  # jinja raises TemplateError and friends for bad conversations
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from e
    # The template already holds any special tokens (BOS); adding them again would double them.
    return list(tok.encode(text, add_special_tokens=False))


def check_prompt(ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """The engine's own prompt checks, made before the request is sent (400, not 500)."""
    if not ids:
        raise APIError(400, "prompt is empty", param="prompt")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
        raise APIError(
            400, f"prompt token ids must be integers in [0, {vocab_size})", param="prompt"
        )
    if len(ids) >= max_model_len:
        raise APIError(
            400,
            f"prompt has {len(ids)} tokens; the maximum context length is {max_model_len} "
            "(prompt plus at least one generated token)",
            param="prompt",
        )
