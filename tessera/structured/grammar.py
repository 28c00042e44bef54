"""A ``StructuredOutputs`` as the grammar engine's input, and the check a request gets at the
edge.

The grammar engine is llguidance (guidance-ai/llguidance): a Rust library with a Python wheel
and no dependencies, whose masks are computed on the CPU for any device. xgrammar, the other
engine vLLM and SGLang use, pulls triton (hundreds of MB) into a CPU install and compiled the
schemas of ``benchmarks/structured_output.py`` slower on this project's machines; see that
benchmark and ``docs/structured_outputs.md``.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from tessera.structured.spec import StructuredOutputs

_JSON_OPTIONS: dict[str, Any] = {
    # No free whitespace: a model then cannot spend its tokens on blanks (a random-weight one
    # would), and the output is compact and readable as Python's json.dumps writes it.
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


_MAX_MESSAGE_CHARS = 400


class GrammarError(ValueError):
    """A constraint the grammar engine cannot compile; the message names the problem."""

    def __init__(self, kind: str, detail: str) -> None:
        # The engine's messages span lines (a caret under the bad spot): one line for a client.
        one_line = " ".join(detail.split())
        super().__init__(f"invalid {kind}: {one_line[:_MAX_MESSAGE_CHARS]}")


def to_grammar(spec: StructuredOutputs) -> str:
    """The llguidance grammar (its JSON form) that ``spec`` describes."""
    kind = spec.kind
    try:
        if kind in ("json", "json_object"):
            schema = spec.json if spec.json is not None else '{"type": "object"}'
            options: Any = _JSON_OPTIONS | {"lenient": not spec.strict}
            return str(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options))
        if kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(spec.regex or ""))
        if kind == "choice":
            lark = "start: " + " | ".join(json.dumps(c) for c in spec.choice or ())
            return str(llguidance.LLMatcher.grammar_from_lark(lark))
        # Lark, or GBNF (llama.cpp's format), which llguidance converts to Lark.
        return str(llguidance.grammar_from("grammar", spec.grammar or ""))
    except ValueError as e:
        raise GrammarError(kind, str(e)) from None


def check_grammar(spec: StructuredOutputs, tokenizer: llguidance.LLTokenizer | None) -> str:
    """The grammar text of ``spec``; ``GrammarError`` naming the problem if it cannot compile."""
    grammar = to_grammar(spec)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        raise GrammarError(spec.kind, messages[0] if messages else "unknown error")
    if spec.strict and spec.kind == "json" and messages:
        # A strict schema must be enforced whole: a keyword llguidance would ignore is an error.
        raise GrammarError("json", messages[0])
    return grammar
