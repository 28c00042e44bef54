"""Hermes format, also Qwen2.5 and Qwen3 (not Qwen3-Coder, which writes XML).

Each call is a JSON object in its own ``<tool_call>`` element; the templates put it on a line
of its own and several calls one after another::

    Let me look both up.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Zürich"}}
    </tool_call>
    <tool_call>
    {"name": "get_time", "arguments": {"zone": "Europe/Zurich"}}
    </tool_call>
"""

from __future__ import annotations

from tessera.serve.tool_parsers.base import ToolParser
from tessera.serve.tool_parsers.cursor import Step
from tessera.serve.tool_parsers.json_call import json_object_call
from tessera.serve.tool_parsers.stream import Outcome, ToolCallStream

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one element per call."""

    name = "hermes"
    entry_markers = (OPEN,)

    def region(self, s: ToolCallStream, marker: str) -> Step[int | None]:
        cur = s.cur
        outcome = yield from json_object_call(s, s.region_start)
        if outcome is Outcome.REJECTED:
            return s.region_start
        if outcome is Outcome.BROKEN:
            yield from cur.skip_through(CLOSE)
            return None
        # A missing close (the output ended, or the model forgot it) does not undo the call.
        yield from cur.skip_ws()
        yield from cur.expect(CLOSE)
        return None
