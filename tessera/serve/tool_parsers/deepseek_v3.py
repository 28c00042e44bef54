"""DeepSeek-V3 / R1 tool calls, and the V3.1 form, between special tokens::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Zürich"}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

V3.1 drops the type word and the fence and chains calls with nothing between them:
``<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Zürich"}<｜tool▁call▁end｜>``. What
follows the separator tells the two apart: arguments (``{``) or a name. The bars are U+FF5C
and the "spaces" U+2581, not ASCII. (V3.2's and V4's DSML markup is a different format.)
"""

from __future__ import annotations

from tessera.serve.tool_parsers.base import ToolParser
from tessera.serve.tool_parsers.cursor import Step
from tessera.serve.tool_parsers.sections import marked_calls
from tessera.serve.tool_parsers.stream import Outcome, ToolCallStream

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
_MAX_NAME_CHARS = 256


class DeepSeekV3ToolParser(ToolParser):
    """DeepSeek-V3/R1 (``function<｜tool▁sep｜>name`` and a ```json fence) and V3.1
    (``name<｜tool▁sep｜>{...}``) calls in a ``<｜tool▁calls▁begin｜>`` section."""

    name = "deepseek_v3"
    # A call without its section is tolerated: the section is then implied.
    entry_markers = (CALLS_BEGIN, CALL_BEGIN)

    def region(self, s: ToolCallStream, marker: str) -> Step[int | None]:
        return (yield from marked_calls(s, self._call, CALL_BEGIN, CALL_END, CALLS_END,
                                        opened=marker == CALL_BEGIN))

    def _call(self, s: ToolCallStream, start: int) -> Step[Outcome]:
        """One call, from just after its ``<｜tool▁call▁begin｜>``."""
        cur = s.cur
        head = yield from cur.read_until((SEP,), _MAX_NAME_CHARS)
        if head is None or not (yield from cur.wait(1)):
            return Outcome.REJECTED
        if cur.peek() == "{":  # V3.1: the name came before the separator
            outcome = yield from s.call(head[0].strip(), None, start)
        else:
            line = yield from cur.read_until(("\n",), _MAX_NAME_CHARS)
            if line is None or not (yield from cur.expect("```")):
                return Outcome.REJECTED
            yield from cur.expect("json")
            outcome = yield from s.call(line[0].strip(), None, start)
            if outcome is Outcome.DONE:
                yield from cur.skip_ws()
                yield from cur.expect("```")
        if outcome is Outcome.DONE:
            yield from cur.skip_ws()
            yield from cur.expect(CALL_END)
        return outcome
