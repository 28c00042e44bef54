"""Reasoning parsers: <think> reasoning split from the answer, whole and streamed in pieces."""

from __future__ import annotations

import random

import pytest

from tessera.serve.reasoning import (
    ReasoningOutput,
    get_reasoning_parser,
    prompt_opens_reasoning,
    reasoning_parser_names,
)
from tessera.serve.tool_parsers import get_tool_parser

# (parser, output, reasoning_content, content)
CASES: list[tuple[str, str, str | None, str | None]] = [
    # R1: the template opened <think>, so the output starts inside the reasoning.
    (
        "deepseek_r1",
        "Okay, 17 × 3: 17 × 3 = 51.\nCheck: 51 / 3 = 17. ✓\n</think>\n\n**51**",
        "Okay, 17 × 3: 17 × 3 = 51.\nCheck: 51 / 3 = 17. ✓",
        "**51**",
    ),
    # R1-0528 writes the opening tag itself.
    (
        "deepseek_r1",
        "<think>\nThe user greets me.\n</think>\n\nHello! 你好!",
        "The user greets me.",
        "Hello! 你好!",
    ),
    # Cut off while thinking: all of it is reasoning.
    ("deepseek_r1", "Let me consider the <thi", "Let me consider the <thi", None),
    ("deepseek_r1", "<think>\n\n</think>\n\nShort answer.", None, "Short answer."),
    # A literal tag in the answer after the reasoning is content.
    ("deepseek_r1", "r</think>Use `</think>` to close.", "r", "Use `</think>` to close."),
    (
        "qwen3",
        "<think>\nThe user wants the capital of France.\n</think>\n\nParis.\n",
        "The user wants the capital of France.",
        "Paris.\n",
    ),
    # Thinking disabled: the template pre-filled an empty block, the output is all answer.
    (
        "qwen3",
        "\n\nParis is the capital of <b>France</b>.",
        None,
        "\n\nParis is the capital of <b>France</b>.",
    ),
    (
        "qwen3",
        "<think>\nStill thinking when max_tokens hit",
        "Still thinking when max_tokens hit",
        None,
    ),
    ("qwen3", "<thinking> is not the tag", None, "<thinking> is not the tag"),
    ("qwen3", "", None, None),
]


def stream_pieces(
    name: str, text: str, rng: random.Random | None, **kwargs: bool
) -> ReasoningOutput:
    """What a client rebuilds from ``text`` streamed in random pieces (or one character each)."""
    stream = get_reasoning_parser(name)(**kwargs).stream()
    reasoning, content = "", ""
    pieces = []
    i = 0
    while i < len(text):
        n = 1 if rng is None else rng.choice((1, 1, 2, 3, 5, 8, 30))
        pieces.append(text[i : i + n])
        i += n
    for delta in [*map(stream.feed, pieces), stream.finish()]:
        assert not (content and delta.reasoning_content), "reasoning after content"
        reasoning += delta.reasoning_content
        content += delta.content
    return ReasoningOutput(reasoning or None, content or None)


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), CASES)
def test_recorded_output_splits_whole(name, text, reasoning, content):
    assert get_reasoning_parser(name)().parse(text) == ReasoningOutput(reasoning, content)


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), CASES)
def test_streamed_pieces_reassemble_to_the_whole_split(name, text, reasoning, content):
    for seed in [None, *range(40)]:
        rng = None if seed is None else random.Random(seed)
        assert stream_pieces(name, text, rng) == ReasoningOutput(reasoning, content)


def test_reasoning_streams_before_the_close_tag():
    stream = get_reasoning_parser("qwen3")().stream()
    assert stream.feed("<thi").reasoning_content == ""  # maybe the opening tag: wait
    delta = stream.feed("nk>\nFirst idea. </th")
    assert (delta.reasoning_content, delta.content) == ("First idea.", "")
    delta = stream.feed("ink>\n\nAnswer")
    assert (delta.reasoning_content, delta.content) == ("", "Answer")


def test_a_prompt_that_opens_the_block_makes_the_output_start_in_reasoning():
    qwen_thinking_prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert prompt_opens_reasoning(qwen_thinking_prompt)
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")
    text = "Greeting.\n</think>\n\nHello!"
    assert get_reasoning_parser("qwen3")().parse(text) == ReasoningOutput(None, text)
    expected = ReasoningOutput("Greeting.", "Hello!")
    assert get_reasoning_parser("qwen3")(starts_in_reasoning=True).parse(text) == expected
    assert stream_pieces("qwen3", text, random.Random(1), starts_in_reasoning=True) == expected
    plain = get_reasoning_parser("deepseek_r1")(starts_in_reasoning=False).parse("Just text.")
    assert plain == ReasoningOutput(None, "Just text.")


def test_reasoning_then_tool_calls_in_one_stream():
    """How the server chains them: the reasoning stream's content feeds the tool-call stream."""
    text = (
        "<think>\nI need the weather.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
    )
    rng = random.Random(3)
    cuts = sorted(rng.sample(range(1, len(text)), 40))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    reasoning_stream = get_reasoning_parser("qwen3")().stream()
    tool_stream = get_tool_parser("hermes")().stream()
    reasoning, content, arguments = "", "", ""
    for piece in [*pieces, None]:
        delta = reasoning_stream.feed(piece) if piece is not None else reasoning_stream.finish()
        reasoning += delta.reasoning_content
        tool_deltas = tool_stream.feed(delta.content)
        if piece is None:
            tool_deltas += tool_stream.finish()
        for d in tool_deltas:
            content += d.content or ""
            if d.tool_call is not None:
                arguments += d.tool_call.arguments or ""
    assert (reasoning, content, arguments) == ("I need the weather.", "", '{"city": "Zürich"}')
    assert [c.name for c in tool_stream.tool_calls] == ["get_weather"]


def test_registry():
    assert reasoning_parser_names() == ["deepseek_r1", "qwen3"]
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        get_reasoning_parser("nope")
    stream = get_reasoning_parser("qwen3")().stream()
    stream.finish()
    with pytest.raises(RuntimeError):
        stream.feed("late")
