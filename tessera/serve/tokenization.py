"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's): a model's tokenizer over HTTP.

``/tokenize`` takes a ``prompt`` (tokenized like a completions prompt) or chat ``messages``
(rendered by the model's chat template exactly as ``/v1/chat/completions`` renders them) and
answers ``{"count", "max_model_len", "tokens"}``, so a client can count tokens against the
context before it sends a request. ``/detokenize`` turns token ids back into text. Both are
bounded like the endpoints they mirror: text by ``max_prompt_chars`` before tokenizing, ids by
the context length and the vocabulary.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tessera.serve.errors import APIError
from tessera.serve.openai_models import ChatCompletionRequest, ChatMessage
from tessera.serve.prompts import chat_prompt, off_loop, tokenize_text
from tessera.serve.state import ModelState


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: ``prompt`` or ``messages``, not both."""

    model_config = ConfigDict(allow_inf_nan=False)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    """For a ``prompt`` only: a chat's template holds its special tokens itself."""
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


async def tokenize(body: TokenizeRequest, state: ModelState) -> dict[str, Any]:
    """The token ids of a prompt or a chat, with the model's context length."""
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt")
    if body.messages is not None:
        if len(body.messages) > state.config.max_num_messages:
            raise APIError(
                400,
                f"the number of messages is {len(body.messages)}; this server takes at most "
                f"{state.config.max_num_messages}",
                param="messages",
            )
        chat = ChatCompletionRequest(
            model=body.model,
            messages=body.messages,
            add_generation_prompt=body.add_generation_prompt,
            chat_template_kwargs=body.chat_template_kwargs,
        )
        ids = await chat_prompt(chat, state.tokenizer, state.max_prompt_chars)
    else:
        assert body.prompt is not None
        ids = await tokenize_text(
            body.prompt, state.tokenizer, state.max_prompt_chars, body.add_special_tokens
        )
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}


async def detokenize(body: DetokenizeRequest, state: ModelState) -> dict[str, Any]:
    """The text of token ids of the model's vocabulary."""
    tokenizer = state.tokenizer
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer", param="tokens")
    ids = body.tokens
    if len(ids) > state.max_model_len:
        raise APIError(
            400,
            f"{len(ids)} tokens; at most the context length ({state.max_model_len}) can be "
            "detokenized",
            param="tokens",
        )
    if any(not 0 <= t < state.vocab_size for t in ids):
        raise APIError(400, f"tokens must be token ids in [0, {state.vocab_size})",
                       param="tokens")  # fmt: skip

    def decode() -> str:
        try:
            return str(tokenizer.decode(ids))
        except Exception as e:  # the tokenizers library raises TypeError, OverflowError, ...
            raise APIError(400, "the tokens cannot be decoded", param="tokens") from e

    return {"prompt": await off_loop(decode)}
