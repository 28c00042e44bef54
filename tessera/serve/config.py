"""The HTTP side's options of ``tessera serve`` and the models it serves (each model's engine
options are in its ``EngineConfig``).

Each field made with ``option`` is also a command-line flag (``tessera.cli_options``), so its
default and help are written here once. Limits bound what one request may cost the server
before it reaches the engine; see the README's "Limits" table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tessera.cli_options import flag_of, option
from tessera.config import EngineConfig
from tessera.serve.reasoning import get_reasoning_parser, reasoning_parser_names
from tessera.serve.tool_parsers import get_tool_parser, tool_parser_names

MIB = 1 << 20


@dataclass(frozen=True)
class ServedModel:
    """One model of the server: the id clients send, and the engine (a core process) behind
    it."""

    name: str
    """The model id clients send and ``/v1/models`` lists."""
    engine: EngineConfig
    aliases: tuple[str, ...] = ()
    """Other ids requests may name this model by (the model path as given, when no name was
    chosen); never shown."""
    tool_call_parser: str | None = None
    """This model's tool-call format (None: the server's ``--tool-call-parser``, else the one
    its chat template shows)."""
    reasoning_parser: str | None = None
    """This model's reasoning format (None: the server's ``--reasoning-parser``)."""

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip():
            raise ValueError(f"a model name must be non-empty without outer spaces: {self.name!r}")
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)  # ValueError naming the choices
        if self.reasoning_parser is not None:
            get_reasoning_parser(self.reasoning_parser)


@dataclass(frozen=True)
class ServeConfig:
    """Options of the API process; built once from the command line (or by tests)."""

    models: tuple[ServedModel, ...]
    """The models served, in the order ``/v1/models`` lists them (and their cores start)."""
    host: str = option("127.0.0.1", "interface to listen on")
    port: int = option(8000, "port to listen on")
    api_key: str | None = option(
        None,
        "require 'Authorization: Bearer KEY' on /v1/* (also --api-key-file or the "
        "TESSERA_API_KEY environment variable, which keep the key off the command line)",
        repr=False,
    )
    metrics_require_key: bool = option(False, "put /metrics behind the API key too")
    max_waiting: int = option(
        1024, "sequences that may wait beyond --max-num-seqs (per model); more get 503 with "
        "Retry-After"
    )
    shutdown_grace_s: float = option(
        30.0,
        "seconds in-flight requests may run after SIGINT/SIGTERM before being aborted",
        flag="--shutdown-timeout",
    )
    max_request_body_bytes: int = option(4 * MIB, "largest request body; larger gets 413")
    request_body_timeout_s: float = option(
        60.0, "seconds a client may take to send a request body; slower gets 408",
        flag="--request-body-timeout",
    )
    max_num_messages: int = option(1024, "most chat messages in one request")
    max_num_stop_strings: int = option(16, "most stop strings in one request")
    max_stop_string_chars: int = option(512, "longest stop string, in characters")
    max_num_stop_token_ids: int = option(256, "most stop_token_ids in one request")
    max_prompt_chars: int | None = option(
        None,
        "longest prompt text (a completions prompt, or a chat rendered by its template) in "
        "characters, checked before tokenizing (default: 64 per token of the context length)",
    )
    engine_stall_timeout_s: float = option(
        60.0,
        "seconds the engine core may go without finishing a step while requests are pending "
        "before it counts as stalled (at least 10x its warm-up, which runs the largest step)",
        flag="--engine-stall-timeout",
    )
    exit_on_engine_failure: bool = option(
        False,
        "exit with code 1 when the engine core dies or stalls, for a supervisor to restart "
        "the server, instead of restarting the core in place",
    )

    tool_call_parser: str | None = option(
        None,
        "format of the model's tool calls, parsed for tool_choice 'auto' ("
        + ", ".join(tool_parser_names())
        + "; qwen, qwen25, qwen3 and llama3 are aliases); default: detected from the chat "
        "template; a model's table in --config may set its own",
    )
    reasoning_parser: str | None = option(
        None,
        "split the model's reasoning into reasoning_content ("
        + ", ".join(reasoning_parser_names()) + "); a model's table in --config may set its own",
    )

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{flag_of(ServeConfig, name)} {why}, got {getattr(self, name)}")

        if not 0 < self.port < 65536:
            raise bad("port", "must be in 1..65535")
        for name in ("max_request_body_bytes", "max_num_messages", "max_num_stop_strings",
                     "max_stop_string_chars", "max_num_stop_token_ids"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise bad("max_prompt_chars", "must be at least 1")
        if self.max_waiting < 0:
            raise bad("max_waiting", "must be non-negative")
        if not (math.isfinite(self.shutdown_grace_s) and self.shutdown_grace_s >= 0):
            raise bad("shutdown_grace_s", "must be a non-negative number of seconds")
        if not (math.isfinite(self.request_body_timeout_s) and self.request_body_timeout_s > 0):
            raise bad("request_body_timeout_s", "must be a positive number of seconds")
        if not (math.isfinite(self.engine_stall_timeout_s) and self.engine_stall_timeout_s > 0):
            raise bad("engine_stall_timeout_s", "must be a positive number of seconds")
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)  # ValueError naming the choices
        if self.reasoning_parser is not None:
            get_reasoning_parser(self.reasoning_parser)
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty")
        if not self.models:
            raise ValueError("no model to serve: give a model directory, --model or --config")
        ids: set[str] = set()
        for model in self.models:
            for model_id in (model.name, *model.aliases):
                if model_id in ids:
                    raise ValueError(f"the model id {model_id!r} is given to two models")
                ids.add(model_id)

    def max_seqs_in_flight(self, model: ServedModel) -> int:
        """Sequences the server admits at once for ``model``; a request needing more can never
        run: the engine's running limit plus the waiting ones."""
        return model.engine.scheduler.max_num_seqs + self.max_waiting
