"""A section of calls between marker tokens, as DeepSeek-V3 and Kimi-K2 write them::

    SECTION_BEGIN CALL_BEGIN <one call> CALL_END CALL_BEGIN ... CALL_END SECTION_END

Each format parses one call its own way; the loop over the section is this one.
"""

from __future__ import annotations

from collections.abc import Callable

from tessera.serve.tool_parsers.cursor import Step
from tessera.serve.tool_parsers.stream import Outcome, ToolCallStream

CallParser = Callable[[ToolCallStream, int], Step[Outcome]]
"""Parses one call from just after its begin marker; gets the stream and where the call's
text started (content from there on if the call is rejected)."""


def marked_calls(s: ToolCallStream, call: CallParser, call_begin: str, call_end: str,
                 section_end: str, opened: bool = False) -> Step[int | None]:
    """The region of a section (see ``ToolParser.region``). ``opened``: the region's marker
    was the first call's ``call_begin`` itself (a call without its section)."""
    cur = s.cur
    start = s.region_start
    first = True
    while True:
        if not opened:
            yield from cur.skip_ws()
            if not (yield from cur.expect(call_begin)):
                break
        opened = False
        outcome = yield from call(s, start)
        if outcome is Outcome.REJECTED:  # content from this call's begin marker on
            return start
        if outcome is Outcome.BROKEN:
            yield from cur.skip_through(call_end)
            return None
        first = False
        start = cur.pos
    if first:
        return s.region_start
    yield from cur.expect(section_end)
    return None
