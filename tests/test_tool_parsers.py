"""Tool-call parsers: recorded outputs of each format, whole and streamed in random pieces."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from tessera.serve.tool_parsers import (
    ParsedOutput,
    StreamDelta,
    ToolCall,
    detect_tool_parser,
    get_tool_parser,
    tool_names,
    tool_parser_names,
    unknown_tool_calls,
)

DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_BEGIN, DS_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
KIMI_SECTION = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>")
KIMI_BEGIN, KIMI_ARGS, KIMI_END = (
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
)

WEATHER = '{"city": "Zürich", "unit": "celsius"}'
SEARCH = '{"query": "café \\"best\\" </tool_call> [ARGS]", "filters": {"tags": ["a", "b"], "max": 3, "exact": false, "near": null}}'
EMPTY = "{}"

# (parser, output, content, [(name, arguments as written)])
CASES: list[tuple[str, str, str | None, list[tuple[str, str]]]] = [
    (
        "hermes",
        f'Let me look both up.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
        f'<tool_call>\n{{"name": "search", "arguments": {SEARCH}}}\n</tool_call>',
        "Let me look both up.",
        [("get_weather", WEATHER), ("search", SEARCH)],
    ),
    (
        "hermes",
        f'<tool_call>{{"name":"now","arguments":{EMPTY}}}</tool_call>\n\nDone — 完成.\n',
        "Done — 完成.\n",
        [("now", EMPTY)],
    ),
    (  # arguments first, and as a string: read whole, sent with the header
        "hermes",
        '<tool_call>\n{"arguments": "{\\"a\\": [1, 2]}", "name": "sum"}\n</tool_call>',
        None,
        [("sum", '{"a": [1, 2]}')],
    ),
    ("hermes", "No tools needed: 2 + 2 = 4. Use <b>bold</b> or <tool?\n\n", None, []),
    (
        "llama3_json",
        f'{{"name": "get_weather", "parameters": {WEATHER}}}',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        "llama3_json",
        f'<|python_tag|>{{"type": "function", "name": "search", "parameters": {SEARCH}}}; '
        f'{{"name": "now", "parameters": {EMPTY}}}',
        None,
        [("search", SEARCH), ("now", EMPTY)],
    ),
    ("llama3_json", '{"name": "Ada Lovelace", "born": 1815}', None, []),
    ("llama3_json", 'The record is {"name": "x", "parameters": {}} as JSON.', None, []),
    (
        "mistral",
        f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {WEATHER}, "id": "abcDEF123"}}, '
        f'{{"name": "search", "arguments": {SEARCH}, "id": "xyzXYZ789"}}]',
        None,
        [("get_weather", WEATHER), ("search", SEARCH)],
    ),
    (
        "mistral",
        f"I'll check.[TOOL_CALLS]get_weather[CALL_ID]abcDEF123[ARGS]{WEATHER}"
        f"[TOOL_CALLS]search[CALL_ID]xyzXYZ789[ARGS]{SEARCH}",
        "I'll check.",
        [("get_weather", WEATHER), ("search", SEARCH)],
    ),
    (
        "mistral",
        f"[TOOL_CALLS]get_weather[ARGS]{WEATHER}[TOOL_CALLS]now[ARGS]{EMPTY}",
        None,
        [("get_weather", WEATHER), ("now", EMPTY)],
    ),
    ("mistral", "Brackets [like these] and [TOOL_CALLS are fine.", None, []),
    (
        "deepseek_v3",
        f"Checking.\n\n{DS_CALLS_BEGIN}{DS_BEGIN}function{DS_SEP}get_weather\n```json\n{WEATHER}\n```{DS_END}\n"
        f"{DS_BEGIN}function{DS_SEP}search\n```json\n{SEARCH}\n```{DS_END}{DS_CALLS_END}",
        "Checking.",
        [("get_weather", WEATHER), ("search", SEARCH)],
    ),
    (
        "deepseek_v3",
        f"{DS_CALLS_BEGIN}{DS_BEGIN}get_weather{DS_SEP}{WEATHER}{DS_END}"
        f"{DS_BEGIN}now{DS_SEP}{EMPTY}{DS_END}{DS_CALLS_END}",
        None,
        [("get_weather", WEATHER), ("now", EMPTY)],
    ),
    (
        "kimi_k2",
        f"Let me search.{KIMI_SECTION[0]}{KIMI_BEGIN}functions.get_weather:0{KIMI_ARGS}{WEATHER}{KIMI_END}"
        f"{KIMI_BEGIN}functions.search:1{KIMI_ARGS}{SEARCH}{KIMI_END}{KIMI_SECTION[1]}",
        "Let me search.",
        [("get_weather", WEATHER), ("search", SEARCH)],
    ),
    (
        "kimi_k2",
        f"{KIMI_SECTION[0]}\n{KIMI_BEGIN}\nfunctions.now:7{KIMI_ARGS}\n{EMPTY}\n{KIMI_END}\n{KIMI_SECTION[1]}",
        None,
        [("now", EMPTY)],
    ),
]
# Plain prose passes through every parser unchanged, odd characters and trailing blanks included.
CASES += [(name, "Plain answer: «ok» <3 [x] {y}\n  ", None, []) for name in tool_parser_names()]

# Malformed: the whole text is content when parsed whole, and streaming it never raises.
MALFORMED: list[tuple[str, str]] = [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1'),  # cut off by max_tokens
    ("hermes", '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>'),
    ("hermes", "<tool_call>\nnot json at all\n</tool_call>"),
    ("hermes", '<tool_call>{"name": "two words", "arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a" 1}}</tool_call>'),
    ("hermes", "ends with a marker start <tool_ca"),
    ("llama3_json", '{"name": "f", "parameters": {"a": tru}}'),
    ("mistral", "[TOOL_CALLS]"),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": '),
    ("mistral", '[TOOL_CALLS] [{"name": "f"}]'),
    ("deepseek_v3", f"{DS_CALLS_BEGIN}{DS_BEGIN}function{DS_SEP}f\n```json\n{{oops}}\n```{DS_END}"),
    ("deepseek_v3", f"{DS_CALLS_BEGIN}{DS_CALLS_END}"),
    ("kimi_k2", f'{KIMI_SECTION[0]}{KIMI_BEGIN}functions.f:0{KIMI_ARGS}{{"a": }}{KIMI_END}'),
    ("kimi_k2", f"{KIMI_SECTION[0]}{KIMI_BEGIN}functions.f:0"),
]


def stream_pieces(parser_name: str, text: str, rng: random.Random | None) -> list[StreamDelta]:
    """Stream ``text`` cut at random places (or one character at a time without ``rng``)."""
    stream = get_tool_parser(parser_name)().stream()
    deltas: list[StreamDelta] = []
    i = 0
    while i < len(text):
        n = 1 if rng is None else rng.choice((1, 1, 2, 3, 5, 8, 13, 40))
        deltas += stream.feed(text[i : i + n])
        i += n
    return deltas + stream.finish()


def assemble(deltas: list[StreamDelta]) -> tuple[str | None, list[dict[str, Any]]]:
    """Content and calls as a client rebuilds them, checking the chunks' OpenAI shape."""
    content = ""
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        chunk = delta.to_openai()
        if "content" in chunk:
            assert chunk["content"], "an empty content delta"
            content += chunk["content"]
            continue
        (piece,) = chunk["tool_calls"]
        if "id" in piece:  # a header: the next index, sent once, before any arguments
            assert piece["index"] == len(calls) and piece["type"] == "function"
            assert piece["function"]["arguments"] == ""
            calls.append({"id": piece["id"], "name": piece["function"]["name"], "arguments": ""})
        else:
            assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
            assert piece["index"] == len(calls) - 1, "arguments of a call that is not the last"
            calls[-1]["arguments"] += piece["function"]["arguments"]
    return content or None, calls


def summary(parsed: ParsedOutput) -> tuple[str | None, list[tuple[str, str]]]:
    return parsed.content, [(c.name, c.arguments) for c in parsed.tool_calls]


@pytest.mark.parametrize(("parser_name", "text", "content", "calls"), CASES)
def test_recorded_output_parses_whole(parser_name, text, content, calls):
    parsed = get_tool_parser(parser_name)().parse(text)
    expected_content = content if content is not None or calls else text
    assert summary(parsed) == (expected_content, calls)
    for call in parsed.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
    assert len({c.id for c in parsed.tool_calls}) == len(parsed.tool_calls)


@pytest.mark.parametrize(("parser_name", "text", "content", "calls"), CASES)
def test_streamed_pieces_reassemble_to_the_whole_parse(parser_name, text, content, calls):
    whole = summary(get_tool_parser(parser_name)().parse(text))
    for seed in [None, *range(40)]:
        rng = None if seed is None else random.Random(seed)
        streamed_content, streamed_calls = assemble(stream_pieces(parser_name, text, rng))
        assert (streamed_content, [(c["name"], c["arguments"]) for c in streamed_calls]) == whole


def test_arguments_stream_before_the_call_ends():
    stream = get_tool_parser("hermes")().stream()
    deltas = stream.feed('Sure.\n<tool_call>\n{"name": "search", "arguments": {"query": "tall')
    shapes = [d.to_openai() for d in deltas]
    assert shapes[0] == {"content": "Sure."}
    assert shapes[1]["tool_calls"][0]["function"]["name"] == "search"
    assert shapes[2] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"query": "tall'}}]}
    assert stream.tool_calls == [] and stream.num_calls_started == 1
    stream.feed(' trees"}}\n</tool_call>')
    assert stream.finish() == []
    assert [c.arguments for c in stream.tool_calls] == ['{"query": "tall trees"}']


def test_a_split_marker_is_held_back_then_released_as_content():
    stream = get_tool_parser("hermes")().stream()
    assert [d.content for d in stream.feed("x <tool_")] == ["x"]
    assert [d.content for d in stream.feed("callback>")] == [" <tool_callback>"]
    stream = get_tool_parser("kimi_k2")().stream()
    assert [d.content for d in stream.feed("a <|tool_calls_sec")] == ["a"]
    assert [d.content for d in stream.finish()] == [" <|tool_calls_sec"]


@pytest.mark.parametrize(("parser_name", "text"), MALFORMED)
def test_malformed_calls_are_content_and_never_raise(parser_name, text):
    assert summary(get_tool_parser(parser_name)().parse(text)) == (text, [])
    for seed in range(10):
        stream_pieces(parser_name, text, random.Random(seed))  # must not raise


def test_a_broken_call_keeps_the_good_calls_before_it():
    good = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
    broken = '<tool_call>\n{"name": "b", "arguments": {"x": 1\n</tool_call>'
    parsed = get_tool_parser("hermes")().parse(good + broken)
    # The blank line between the calls is not content; the broken call's text is.
    assert summary(parsed) == (broken, [("a", "{}")])


def test_unknown_tool_names_stay_content_when_the_parser_knows_the_tools():
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {}}},
        {"type": "function", "function": {"name": "search"}},
        {"type": "other"},
    ]
    names = tool_names(tools)
    assert names == {"get_weather", "search"}
    text = '<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>'
    parser = get_tool_parser("hermes")(tool_names=names)
    assert summary(parser.parse(text)) == (text, [])
    assert assemble(stream_pieces("hermes", text, random.Random(0)))[1] != []  # no names given
    calls = [ToolCall("1", "search", "{}"), ToolCall("2", "delete_all", "{}")]
    assert [c.name for c in unknown_tool_calls(calls, names)] == ["delete_all"]


def test_call_ids_follow_each_format():
    text = "".join(
        f'<tool_call>{{"name": "f", "arguments": {{"i": {i}}}}}</tool_call>' for i in range(5)
    )
    ids = [c.id for c in get_tool_parser("hermes")().parse(text).tool_calls]
    assert len(set(ids)) == 5 and all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    mistral = get_tool_parser("mistral")().parse(
        "[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]g[CALL_ID]abcDEF123[ARGS]{}"
    )
    fresh, kept = (c.id for c in mistral.tool_calls)
    assert re.fullmatch(r"[A-Za-z0-9]{9}", fresh) and kept == "abcDEF123"
    kimi = f"{KIMI_SECTION[0]}" + "".join(
        f"{KIMI_BEGIN}functions.f:{i}{KIMI_ARGS}{{}}{KIMI_END}" for i in (3, 4, 3)
    )
    ids = [c.id for c in get_tool_parser("kimi_k2")().parse(kimi).tool_calls]
    assert ids[:2] == ["functions.f:3", "functions.f:4"] and ids[2] not in ids[:2]
    # A repeated id whose fresh replacements are taken too.
    kimi = f"{KIMI_SECTION[0]}" + "".join(
        f"{KIMI_BEGIN}functions.f:{i}{KIMI_ARGS}{{}}{KIMI_END}" for i in (2, 3, 4, 2)
    )
    ids = [c.id for c in get_tool_parser("kimi_k2")().parse(kimi).tool_calls]
    assert ids == ["functions.f:2", "functions.f:3", "functions.f:4", "functions.f:5"]


def test_openai_shapes():
    call = ToolCall("call_1", "f", '{"a": 1}')
    assert call.to_openai() == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": '{"a": 1}'},
    }
    assert StreamDelta(content="hi").to_openai() == {"content": "hi"}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{- '<tool_call>\\n' }}{{- tool_call | tojson }}{{- '\\n</tool_call>' }}", "hermes"),
        ("{%- if tool_calls %}[TOOL_CALLS]{{ tool_calls | tojson }}{%- endif %}", "mistral"),
        ("{{- '[TOOL_CALLS]' + tc.function.name + '[ARGS]' + args }}", "mistral"),
        ("<|start_header_id|>ipython<|end_header_id|>{{- '<|python_tag|>' }}", "llama3_json"),
        (
            '{{- \'{"name": "\' + tc.name + \'", "parameters": \' }}<|start_header_id|>',
            "llama3_json",
        ),
        (f"{{{{'{DS_CALLS_BEGIN}{DS_BEGIN}' + tool['type'] + '{DS_SEP}'}}}}", "deepseek_v3"),
        ("{{- '<|tool_calls_section_begin|>' -}}{%- for tc in message.tool_calls -%}", "kimi_k2"),
        ("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}", None),
    ],
)
def test_parser_guessed_from_the_chat_template(template, expected):
    assert detect_tool_parser(template) == expected


def test_registry():
    assert tool_parser_names() == ["deepseek_v3", "hermes", "kimi_k2", "llama3_json", "mistral"]
    assert get_tool_parser("qwen3") is get_tool_parser("hermes")
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        get_tool_parser("nope")
    with pytest.raises(RuntimeError):
        stream = get_tool_parser("hermes")().stream()
        stream.finish()
        stream.feed("late")
