"""The state the server's handlers share: one ``ModelState`` per served model, and the
``ServerState`` that routes a request's ``model`` to it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from tessera.serve.config import ServeConfig, ServedModel
from tessera.serve.engine_client import EngineClient
from tessera.serve.errors import APIError
from tessera.serve.metrics import ModelMetrics, ServerMetrics
from tessera.serve.prompts import server_template
from tessera.serve.reasoning import ReasoningParser, get_reasoning_parser
from tessera.serve.tool_parsers import detect_tool_parser

_PROMPT_CHARS_PER_TOKEN = 64
"""Default bound on a prompt's text per token of context: tokenizers' longest tokens are tens
of characters (runs of spaces), so a longer text cannot fit the context and is refused before
tokenizing it costs anything."""


@dataclass
class ModelState:
    """What a handler needs of one model: its engine client, tokenizer, metrics and admission
    count (each model admits up to its own engine's limit)."""

    config: ServeConfig
    model: ServedModel
    client: EngineClient
    tokenizer: Any
    metrics: ModelMetrics
    max_model_len: int
    vocab_size: int
    created_s: int = field(default_factory=lambda: int(time.time()))
    num_seqs_in_flight: int = 0
    shutting_down: bool = False

    @cached_property
    def tool_parser_name(self) -> str | None:
        """The tool-call format of ``tool_choice: auto``: the configured one, else the one the
        chat template shows (None: auto is refused)."""
        configured = self.model.tool_call_parser or self.config.tool_call_parser
        if configured is not None:
            return configured
        template = server_template(self.tokenizer) if self.tokenizer is not None else None
        return detect_tool_parser(template) if template else None

    @cached_property
    def reasoning_parser(self) -> ReasoningParser | None:
        name = self.model.reasoning_parser or self.config.reasoning_parser
        return None if name is None else get_reasoning_parser(name)()

    @property
    def name(self) -> str:
        """The model id responses carry."""
        return self.model.name

    @property
    def max_prompt_chars(self) -> int:
        configured = self.config.max_prompt_chars
        return configured or _PROMPT_CHARS_PER_TOKEN * self.max_model_len

    def card(self) -> dict[str, Any]:
        """The model's entry of ``/v1/models``: the served name only (the model's directory
        is the operator's business)."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created_s,
            "owned_by": "tessera",
            "root": self.name,
            "max_model_len": self.max_model_len,
        }

    def admit(self, num_seqs: int) -> None:
        """Count ``num_seqs`` new sequences in, or raise 503 when the queue is full."""
        self.check_capacity(num_seqs)
        self.num_seqs_in_flight += num_seqs

    def check_capacity(self, num_seqs: int) -> None:
        """Raise 400 if ``num_seqs`` sequences could never be admitted, 503 (with Retry-After)
        unless they may start now."""
        limit = self.config.max_seqs_in_flight(self.model)
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
            raise APIError(
                503, f"the engine core of {self.name!r} is not running",
                headers={"Retry-After": "5"},
            )
        if self.num_seqs_in_flight + num_seqs > limit:
            raise APIError(
                503,
                f"the server is at capacity for {self.name!r} ({self.num_seqs_in_flight} "
                f"sequences in flight, limit {limit}); retry later",
                headers={"Retry-After": "1"},
            )

    def leave(self, num_seqs: int) -> None:
        self.num_seqs_in_flight -= num_seqs


@dataclass
class ServerState:
    """Every served model by id (names and aliases), and the metrics they share."""

    config: ServeConfig
    models: list[ModelState]
    metrics: ServerMetrics
    by_id: dict[str, ModelState] = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = {
            model_id: m for m in self.models for model_id in (m.name, *m.model.aliases)
        }

    def model(self, model_id: str | None) -> ModelState:
        """The model a request names; with one model served, a request may name none."""
        if model_id is None:
            if len(self.models) == 1:
                return self.models[0]
            names = ", ".join(m.name for m in self.models)
            raise APIError(
                400, f"model is required: this server serves {names}", param="model"
            )
        found = self.by_id.get(model_id)
        if found is None:
            raise APIError(
                404, f"The model `{model_id}` does not exist.", param="model",
                code="model_not_found",
            )
        return found

    def begin_shutdown(self) -> None:
        """New requests get 503 from now on."""
        for m in self.models:
            m.shutting_down = True

    @property
    def num_in_flight(self) -> int:
        """Requests the engine cores still run, over all models."""
        return sum(m.client.num_in_flight for m in self.models)
