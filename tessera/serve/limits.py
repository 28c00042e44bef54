"""Per-request limits beyond ``SamplingParams``' ranges: what the server's options bound.

Checked on the request body before anything is tokenized or sent to the engine core.
"""

from __future__ import annotations

from tessera.serve.config import ServeConfig
from tessera.serve.errors import APIError
from tessera.serve.openai_models import ChatCompletionRequest, CompletionRequest


def check_limits(
    body: CompletionRequest | ChatCompletionRequest, config: ServeConfig, vocab_size: int
) -> None:
    """Raise a 400 naming the field for a request over one of the server's limits."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stop) > config.max_num_stop_strings:
        raise APIError(
            400,
            f"stop has {len(stop)} strings; this server takes at most "
            f"{config.max_num_stop_strings}",
            param="stop",
        )
    for s in stop:
        if len(s) > config.max_stop_string_chars:
            raise APIError(
                400,
                f"a stop string has {len(s)} characters; this server takes at most "
                f"{config.max_stop_string_chars}",
                param="stop",
            )
    ids = body.stop_token_ids or []
    if len(ids) > config.max_num_stop_token_ids:
        raise APIError(
            400,
            f"stop_token_ids has {len(ids)} ids; this server takes at most "
            f"{config.max_num_stop_token_ids}",
            param="stop_token_ids",
        )
    if any(not 0 <= t < vocab_size for t in ids):
        raise APIError(
            400, f"stop_token_ids must be token ids in [0, {vocab_size})", param="stop_token_ids"
        )
    if isinstance(body, ChatCompletionRequest) and len(body.messages) > config.max_num_messages:
        raise APIError(
            400,
            f"messages has {len(body.messages)} entries; this server takes at most "
            f"{config.max_num_messages}",
            param="messages",
        )
