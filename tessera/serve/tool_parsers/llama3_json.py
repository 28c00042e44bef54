"""Llama 3.1/3.2/3.3 JSON tool calls.

The reply is a JSON object ``{"name": ..., "parameters": {...}}``, sometimes after the
``<|python_tag|>`` token and sometimes with an extra ``"type": "function"``; several calls are
separated by ``;``. The templates send one call per message, so anything else is tolerated
rather than expected. A bare object counts only at the very start of the reply: JSON later in
prose is content. (Llama 3.2's and 4's pythonic ``[f(x=1)]`` syntax is a different format.)
"""

from __future__ import annotations

from tessera.serve.tool_parsers.base import ToolParser
from tessera.serve.tool_parsers.cursor import Step
from tessera.serve.tool_parsers.json_call import json_object_call
from tessera.serve.tool_parsers.stream import Outcome, ToolCallStream

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    """``[<|python_tag|>]{"name": ..., "parameters": {...}}[; {...}]``."""

    name = "llama3_json"
    entry_markers = (PYTHON_TAG,)
    bare_json_start = True

    def region(self, s: ToolCallStream, marker: str) -> Step[int | None]:
        cur = s.cur
        start = resume_at = s.region_start
        while True:
            outcome = yield from json_object_call(s, start)
            if outcome is Outcome.REJECTED:
                return resume_at
            if outcome is Outcome.BROKEN:
                return None
            yield from cur.skip_ws()
            resume_at = cur.pos  # a ';' not followed by a call is content
            if not (yield from cur.expect(";")):
                return None
            start = cur.pos
