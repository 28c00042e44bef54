"""Tool calls out of a model's generated text, in OpenAI's shape, whole or streamed.

``get_tool_parser(name)(tool_names=...)`` makes a parser; ``parser.parse(text)`` splits a whole
output into content and ``ToolCall``s, and ``parser.stream()`` gives a ``ToolCallStream`` that
takes the output in pieces (``feed``, then ``finish``) and returns ``StreamDelta``s.
"""

from __future__ import annotations

from tessera.serve.tool_parsers.base import ToolParser
from tessera.serve.tool_parsers.names import tool_names, unknown_tool_calls
from tessera.serve.tool_parsers.registry import (
    detect_tool_parser,
    get_tool_parser,
    tool_parser_names,
)
from tessera.serve.tool_parsers.stream import ToolCallStream
from tessera.serve.tool_parsers.types import ParsedOutput, StreamDelta, ToolCall, ToolCallDelta

__all__ = [
    "ParsedOutput",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStream",
    "ToolParser",
    "detect_tool_parser",
    "get_tool_parser",
    "tool_names",
    "tool_parser_names",
    "unknown_tool_calls",
]
