"""What a chat request's ``tools`` and ``tool_choice`` ask of the server.

- ``none`` (or no tools): the output is plain content.
- ``auto``: the model decides; its output is parsed for calls in its family's format (the
  server's ``--tool-call-parser``, or the one its chat template shows).
- ``required`` or a named function: the output is constrained by a grammar, so even a model
  that would not comply emits calls whose arguments validate against the tools' schemas. The
  constrained output is JSON (an array of ``{"name", "arguments"}`` objects for ``required``,
  the arguments object itself for a named function), turned into OpenAI tool calls here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from tessera.serve.errors import APIError
from tessera.serve.openai_models import ChatCompletionRequest, ChatTool
from tessera.serve.tool_parsers import ToolCall, ToolParser, get_tool_parser
from tessera.serve.tool_parsers.types import openai_call_id
from tessera.structured.spec import StructuredOutputs

ToolMode = Literal["none", "auto", "required", "named"]

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolPlan:
    mode: ToolMode = "none"
    tools: list[dict[str, Any]] = field(default_factory=list)
    """The tools as the chat template takes them (OpenAI's shape)."""
    parser: ToolParser | None = None
    """For ``auto``: the parser of the model's call format."""
    function: str | None = None
    """For ``named``: the function every output calls."""
    constraint: StructuredOutputs | None = None
    """For ``required`` and ``named``: the grammar of the output."""


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or _ANY_OBJECT


def plan_tools(body: ChatCompletionRequest, parser_name: str | None) -> ToolPlan:
    """The plan for ``body``; 400 for a choice the request or server cannot honour."""
    tools = body.tools or []
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools:
        if choice != "none":
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    rendered = [t.model_dump(exclude_none=True) for t in tools]
    strict = all(t.function.strict for t in tools)
    if choice == "none":
        return ToolPlan("none", rendered)
    if choice == "auto":
        if parser_name is None:
            raise APIError(
                400,
                "tool_choice 'auto' needs a tool-call parser: start the server with "
                "--tool-call-parser NAME (this model's chat template shows no known format); "
                "'required' or a named function work without one",
                param="tool_choice",
            )
        parser = get_tool_parser(parser_name)(tool_names=[t.function.name for t in tools])
        return ToolPlan("auto", rendered, parser=parser)
    if choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": _parameters(t)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not body.parallel_tool_calls:
            schema["maxItems"] = 1
        return ToolPlan("required", rendered,
                        constraint=StructuredOutputs.json_schema(schema, strict=strict))
    named = choice.function.name
    tool = next((t for t in tools if t.function.name == named), None)
    if tool is None:
        raise APIError(400, f"tool_choice names {named!r}, which is not in tools",
                       param="tool_choice")
    return ToolPlan("named", rendered, function=named,
                    constraint=StructuredOutputs.json_schema(_parameters(tool), strict=strict))


def forced_calls(plan: ToolPlan, text: str) -> list[ToolCall] | None:
    """The calls in a ``required``/``named`` output; None if it is not complete JSON (cut
    short by max_tokens or a stop string), which is then returned as content."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if plan.mode == "named":
        # The arguments as generated, so they equal what a stream sent piece by piece.
        assert plan.function is not None
        return [ToolCall(openai_call_id(), plan.function, text)]
    return [
        ToolCall(openai_call_id(), call["name"],
                 json.dumps(call["arguments"], ensure_ascii=False, separators=(", ", ": ")))
        for call in value
    ]


def template_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Tool-related fields of the history as chat templates read them: an assistant's calls
    with their arguments as objects (templates write them with ``tojson``), and a tool
    message's ``tool_call_id``. Index-aligned with ``body.messages``; empty dicts elsewhere."""
    extras: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        extra: dict[str, Any] = {}
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise APIError(400, f"messages[{i}].tool_calls: each call needs "
                                   "function.name", param="messages")
                arguments = function.get("arguments", "{}")
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments or "{}")
                    except ValueError:
                        raise APIError(400, f"messages[{i}].tool_calls: arguments are not "
                                       "valid JSON", param="messages") from None
                calls.append({"id": call.get("id"), "type": "function",
                              "function": {"name": function["name"], "arguments": arguments}})
            extra["tool_calls"] = calls
        if m.tool_call_id is not None:
            extra["tool_call_id"] = m.tool_call_id
        extras.append(extra)
    return extras
