"""Checking calls against the tools a request offers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tessera.serve.tool_parsers.types import ToolCall


def tool_names(tools: Iterable[Mapping[str, Any]] | None) -> frozenset[str]:
    """The function names in a request's ``tools`` (OpenAI's ``{"type": "function",
    "function": {"name": ...}}``); entries of another shape are ignored."""
    names: set[str] = set()
    for tool in tools or ():
        function = tool.get("function")
        if tool.get("type", "function") == "function" and isinstance(function, Mapping):
            name = function.get("name")
            if isinstance(name, str):
                names.add(name)
    return frozenset(names)


def unknown_tool_calls(calls: Iterable[ToolCall], names: Iterable[str]) -> list[ToolCall]:
    """The calls of a function the request did not offer.

    Giving the parser the names (``ToolParser(tool_names=...)``) keeps such calls out of the
    response altogether, as content, streamed or not; this is for a server that parses
    without them and wants to flag or drop such calls afterwards.
    """
    offered = set(names)
    return [call for call in calls if call.name not in offered]
