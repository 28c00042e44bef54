"""A call written as one JSON object: ``{"name": "f", "arguments": {...}}``.

Hermes/Qwen, Llama 3 (with ``parameters``) and Mistral's JSON list all write calls so. When
``name`` comes before the arguments (as the templates write it) the arguments stream as they
arrive; otherwise (arguments first, or arguments as a JSON string holding the object) they are
read whole and sent with the header once the object is complete. Other keys (``"type":
"function"``, Mistral's ``"id"``) are skipped. An object without a name or without arguments
is not a call: a JSON answer such as ``{"name": "Ada", "age": 36}`` stays content.
"""

from __future__ import annotations

import json

from tessera.serve.tool_parsers.cursor import Step
from tessera.serve.tool_parsers.stream import Outcome, ToolCallStream


def json_object_call(
    s: ToolCallStream, start: int, argument_keys: tuple[str, ...] = ("arguments", "parameters")
) -> Step[Outcome]:
    """Parse the object that follows the cursor (after whitespace) as one call starting at
    ``start``. After DONE the cursor is past the object, or at whatever stopped it: once the
    arguments are complete, a fault in the rest of the object does not undo the call."""
    cur = s.cur
    yield from cur.skip_ws()
    if not (yield from cur.expect("{")):
        return Outcome.REJECTED
    name: str | None = None
    arguments: str | None = None
    sent = False
    while True:
        yield from cur.skip_ws()
        key = yield from cur.json_string()
        yield from cur.skip_ws()
        if key is None or not (yield from cur.expect(":")):
            break
        yield from cur.skip_ws()
        if key == "name" and name is None:
            name = yield from cur.json_string()
            if name is None:
                break
        elif key in argument_keys and arguments is None and not sent:
            if name is not None and (yield from cur.at("{")):
                outcome = yield from s.call(name, None, start)
                if outcome is not Outcome.DONE:
                    return outcome
                sent = True
            else:
                arguments = yield from cur.json_value()
                if arguments is None:
                    break
        elif (yield from cur.json_value()) is None:
            break
        yield from cur.skip_ws()
        separator = yield from cur.one_of(",", "}")
        if separator != ",":
            break
    if sent:
        return Outcome.DONE
    if name is None or arguments is None:
        return Outcome.REJECTED
    return s.complete_call(name, None, start, _object_text(arguments))


def _object_text(arguments: str) -> str:
    """The arguments as JSON object text: as written, or decoded from a JSON string that
    holds one (some models quote their arguments)."""
    value = json.loads(arguments)
    return value if isinstance(value, str) else arguments
