"""The values tool-call parsing produces, shaped as OpenAI's chat completions API sends them.

A non-streamed response carries a ``ParsedOutput``: the assistant's text and its complete
``ToolCall``s. A streamed one carries ``StreamDelta``s: text, a call's header (index, id, name)
or a fragment of its arguments. For a well-formed output the fragments of a call concatenate
to exactly the ``arguments`` the non-streamed parse gives.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from typing import Any

_ALPHANUMERIC = string.ascii_letters + string.digits


def openai_call_id() -> str:
    """A fresh id in OpenAI's style: ``call_`` and 24 hex digits (96 random bits)."""
    return f"call_{secrets.token_hex(12)}"


def alphanumeric_call_id(length: int = 9) -> str:
    """A fresh id of ``length`` letters and digits (Mistral's templates refuse any other)."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete call of a function tool."""

    id: str
    name: str
    arguments: str
    """A JSON object as text, as OpenAI sends it (not a parsed dict)."""

    def to_openai(self) -> dict[str, Any]:
        """The call as an element of a response message's ``tool_calls``."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """A whole generation split into the assistant's text and its tool calls."""

    content: str | None
    """The text outside tool calls; None when there is none (OpenAI sends ``null``)."""
    tool_calls: list[ToolCall]


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of the call at ``index``: its header (``id`` and ``name`` set, sent first and
    once) or a fragment of its arguments (only ``arguments`` set)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The element of a chunk's ``delta.tool_calls`` that OpenAI would send."""
        if self.name is not None:
            return {
                "index": self.index,
                "id": self.id,
                "type": "function",
                "function": {"name": self.name, "arguments": ""},
            }
        return {"index": self.index, "function": {"arguments": self.arguments or ""}}


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """What one streamed chunk adds: either assistant text or a piece of one tool call."""

    content: str | None = None
    tool_call: ToolCallDelta | None = None

    def to_openai(self) -> dict[str, Any]:
        """The chunk's ``delta`` object (without ``role``)."""
        if self.tool_call is not None:
            return {"tool_calls": [self.tool_call.to_openai()]}
        return {"content": self.content or ""}
