"""Kimi-K2 tool calls, in a section of special tokens::

    <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0
    <|tool_call_argument_begin|>{"city": "Zürich"}<|tool_call_end|><|tool_calls_section_end|>

The name lives in the call id, ``functions.NAME:IDX`` with IDX a counter over the whole
conversation. The template writes a call's id back into the history as it gets it, and
Moonshot's guidance is that the model expects that form there, so the model's id is kept as
the call's id (a fresh one only replaces an id repeated within one output). The section
markers are not special tokens; the ones inside are, so the server must keep them.
"""

from __future__ import annotations

import re

from tessera.serve.tool_parsers.base import ToolParser
from tessera.serve.tool_parsers.cursor import Step
from tessera.serve.tool_parsers.sections import marked_calls
from tessera.serve.tool_parsers.stream import Outcome, ToolCallStream

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
_KIMI_ID = re.compile(r"(?:functions\.)?(?P<name>.+):\d+")
_MAX_ID_CHARS = 256


class KimiK2ToolParser(ToolParser):
    """``<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{...}<|tool_call_end|>``
    calls in a ``<|tool_calls_section_begin|>`` section."""

    name = "kimi_k2"
    entry_markers = (SECTION_BEGIN,)

    def new_call_id(self, name: str, index: int) -> str:
        return f"functions.{name}:{index}"

    def region(self, s: ToolCallStream, marker: str) -> Step[int | None]:
        return (yield from marked_calls(s, self._call, CALL_BEGIN, CALL_END, SECTION_END))

    def _call(self, s: ToolCallStream, start: int) -> Step[Outcome]:
        """One call, from just after its ``<|tool_call_begin|>``."""
        cur = s.cur
        found = yield from cur.read_until((ARGUMENT_BEGIN,), _MAX_ID_CHARS)
        if found is None:
            return Outcome.REJECTED
        call_id = found[0].strip()
        m = _KIMI_ID.fullmatch(call_id)
        name = m["name"] if m else call_id
        outcome = yield from s.call(name, call_id if m else None, start)
        if outcome is Outcome.DONE:
            yield from cur.skip_ws()
            yield from cur.expect(CALL_END)
        return outcome
