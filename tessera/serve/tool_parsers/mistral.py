"""Mistral tool calls, after the ``[TOOL_CALLS]`` control token, in both generations:

- tokenizers v3 and v7 (Mistral-7B-Instruct-v0.3, Mixtral, Nemo): a JSON list,
  ``[TOOL_CALLS] [{"name": "f", "arguments": {...}, "id": "abcDEF123"}, ...]``;
- tokenizer v11 (Mistral-Small-3.2) and v13+ (Magistral, Ministral-3, Devstral-2): one
  ``[TOOL_CALLS]`` per call, ``[TOOL_CALLS]f[CALL_ID]abcDEF123[ARGS]{...}`` with v11's id
  and without it from v13 (``[TOOL_CALLS]f[ARGS]{...}``).

The control tokens are special: the server must decode with them kept. Mistral's templates
refuse a call id that is not 9 letters and digits, so fresh ids are of that form, and an id
the model wrote after ``[CALL_ID]`` is kept.
"""

from __future__ import annotations

from tessera.serve.tool_parsers.base import ToolParser
from tessera.serve.tool_parsers.cursor import Step
from tessera.serve.tool_parsers.json_call import json_object_call
from tessera.serve.tool_parsers.stream import Outcome, ToolCallStream
from tessera.serve.tool_parsers.types import alphanumeric_call_id

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_MAX_NAME_CHARS = 256
_MAX_ID_CHARS = 64


class MistralToolParser(ToolParser):
    """``[TOOL_CALLS][{...}, ...]`` or ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}``."""

    name = "mistral"
    entry_markers = (TOOL_CALLS,)

    def new_call_id(self, name: str, index: int) -> str:
        return alphanumeric_call_id()

    def region(self, s: ToolCallStream, marker: str) -> Step[int | None]:
        cur = s.cur
        yield from cur.skip_ws()
        if (yield from cur.expect("[")):
            return (yield from self._json_list(s))
        # The compact form; a name running straight into its arguments is tolerated too.
        head = yield from cur.read_until((ARGS, CALL_ID, "{"), _MAX_NAME_CHARS)
        if head is None:
            return s.region_start
        name, after = head
        call_id = None
        if after == "{":
            cur.pos -= 1
        elif after == CALL_ID:
            found = yield from cur.read_until((ARGS,), _MAX_ID_CHARS)
            if found is None:
                return s.region_start
            call_id = found[0].strip() or None
        outcome = yield from s.call(name.strip(), call_id, s.region_start)
        return s.region_start if outcome is Outcome.REJECTED else None

    def _json_list(self, s: ToolCallStream) -> Step[int | None]:
        cur = s.cur
        start = s.region_start
        while True:
            outcome = yield from json_object_call(s, start, ("arguments",))
            if outcome is Outcome.REJECTED:
                return start
            if outcome is Outcome.BROKEN:
                return None
            yield from cur.skip_ws()
            if (yield from cur.one_of(",", "]")) != ",":
                return None
            start = cur.pos
