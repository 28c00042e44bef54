"""The state the server's handlers share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from tessera.serve.config import ServeConfig
from tessera.serve.engine_client import EngineClient
from tessera.serve.errors import APIError
from tessera.serve.metrics import ServerMetrics
from tessera.serve.prompts import server_template
from tessera.serve.reasoning import ReasoningParser, get_reasoning_parser
from tessera.serve.tool_parsers import detect_tool_parser

_PROMPT_CHARS_PER_TOKEN = 64
"""Default bound on a prompt's text per token of context: tokenizers' longest tokens are tens
of characters (runs of spaces), so a longer text cannot fit the context and is refused before
tokenizing it costs anything."""


@dataclass
class ServerState:
    """What every handler needs: the engine client, tokenizer, metrics and admission count."""

    config: ServeConfig
    client: EngineClient
    tokenizer: Any
    metrics: ServerMetrics
    max_model_len: int
    vocab_size: int
    created_s: int = field(default_factory=lambda: int(time.time()))
    num_seqs_in_flight: int = 0
    shutting_down: bool = False

    @cached_property
    def tool_parser_name(self) -> str | None:
        """The tool-call format of ``tool_choice: auto``: the configured one, else the one the
        chat template shows (None: auto is refused)."""
        if self.config.tool_call_parser is not None:
            return self.config.tool_call_parser
        template = server_template(self.tokenizer) if self.tokenizer is not None else None
        return detect_tool_parser(template) if template else None

    @cached_property
    def reasoning_parser(self) -> ReasoningParser | None:
        name = self.config.reasoning_parser
        return None if name is None else get_reasoning_parser(name)()

    @property
    def max_prompt_chars(self) -> int:
        configured = self.config.max_prompt_chars
        return configured or _PROMPT_CHARS_PER_TOKEN * self.max_model_len

    def admit(self, num_seqs: int) -> None:
        """Count ``num_seqs`` new sequences in, or raise 503 when the queue is full."""
        self.check_capacity(num_seqs)
        self.num_seqs_in_flight += num_seqs

    def check_capacity(self, num_seqs: int) -> None:
        """Raise 400 if ``num_seqs`` sequences could never be admitted, 503 (with Retry-After)
        unless they may start now."""
        limit = self.config.max_seqs_in_flight
        if num_seqs > limit:
            raise APIError(
                400,
                f"the request needs {num_seqs} sequences (n times the number of prompts); this "
                f"server admits at most {limit} at once",
                param="n",
            )
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if not self.client.alive:
            raise APIError(503, "the engine core is not running", headers={"Retry-After": "5"})
        if self.num_seqs_in_flight + num_seqs > limit:
            raise APIError(
                503,
                f"the server is at capacity ({self.num_seqs_in_flight} sequences in flight, "
                f"limit {limit}); retry later",
                headers={"Retry-After": "1"},
            )

    def leave(self, num_seqs: int) -> None:
        self.num_seqs_in_flight -= num_seqs
