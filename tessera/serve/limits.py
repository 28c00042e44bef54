"""Per-request limits beyond ``SamplingParams``' ranges: what the server's options bound.

Checked on the request body before anything is tokenized or sent to the engine core.
"""

from __future__ import annotations

from tessera.serve.config import ServeConfig
from tessera.serve.errors import APIError
from tessera.serve.openai_models import ChatCompletionRequest, CompletionRequest


def _at_most(what: str, num: int, limit: int, param: str) -> None:
    if num > limit:
        raise APIError(400, f"{what} {num}; this server takes at most {limit}", param=param)


def check_limits(
    body: CompletionRequest | ChatCompletionRequest, config: ServeConfig, vocab_size: int
) -> None:
    """Raise a 400 naming the field for a request over one of the server's limits."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    _at_most("the number of stop strings is", len(stop), config.max_num_stop_strings, "stop")
    for s in stop:
        _at_most("the characters of a stop string are", len(s), config.max_stop_string_chars,
                 "stop")  # fmt: skip
    ids = body.stop_token_ids or []
    _at_most("the number of stop_token_ids is", len(ids), config.max_num_stop_token_ids,
             "stop_token_ids")  # fmt: skip
    if any(not 0 <= t < vocab_size for t in ids):
        raise APIError(
            400, f"stop_token_ids must be token ids in [0, {vocab_size})", param="stop_token_ids"
        )
    for key in body.logit_bias or {}:
        if not key.isdigit() or not int(key) < vocab_size:
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab_size}), got "
                           f"{key[:32]!r}", param="logit_bias")
    if isinstance(body, ChatCompletionRequest):
        _at_most("the number of messages is", len(body.messages), config.max_num_messages,
                 "messages")  # fmt: skip
