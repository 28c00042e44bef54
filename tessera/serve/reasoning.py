"""Reasoning (``<think>...</think>``) split from the answer, whole or streamed.

A reasoning model writes its thinking first, then closes it with ``</think>`` and answers; the
response carries the thinking as ``reasoning_content`` and the answer as ``content``. Whether
the output starts inside the thinking depends on the template:

- ``deepseek_r1``: DeepSeek-R1's template opens ``<think>`` in the prompt, so the output may
  start inside the reasoning without the tag; text before ``</think>`` is reasoning, and an
  output that never closes it (cut off while thinking) is all reasoning. An opening tag the
  model writes itself (R1-0528) is dropped.
- ``qwen3``: Qwen3 writes ``<think>`` itself; without it (thinking disabled, where the template
  pre-fills an empty block) the whole output is content.

Templates that open the block in the prompt for a model whose parser would not expect it
(Qwen3-Thinking-2507, Kimi-K2.5) are covered by ``starts_in_reasoning``, which the server can
set from ``prompt_opens_reasoning(prompt)``. Whitespace around the reasoning and between
``</think>`` and the answer is dropped; the answer is otherwise passed through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningOutput:
    """A whole output split; None for a part that is empty."""

    reasoning_content: str | None
    content: str | None


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """What one piece of output adds: reasoning first, then content (either may be "")."""

    reasoning_content: str = ""
    content: str = ""


class ReasoningStream:
    """Splits one generation fed in pieces of any size: ``feed`` each, then ``finish``."""

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._starts_in_reasoning = starts_in_reasoning
        self._buffer = ""
        """Text not yet released: a possible start of a tag, or reasoning's trailing blanks."""
        # "start" until an opening tag is ruled out, then "reasoning" and/or "content".
        self._state = "start"
        self._reasoning_started = False
        self._after_close = False
        self._finished = False
        self._reasoning_log: list[str] = []
        self._content_log: list[str] = []

    def feed(self, text: str) -> ReasoningDelta:
        """Take the next piece of generated text; the reasoning and content it completes."""
        if self._finished:
            raise RuntimeError("feed after finish")
        self._buffer += text
        return self._advance()

    def finish(self) -> ReasoningDelta:
        """End the generation and release what was held back."""
        if self._finished:
            return ReasoningDelta()
        self._finished = True
        return self._advance()

    def result(self) -> ReasoningOutput:
        """The whole output as a non-streamed response gives it (after ``finish``)."""
        reasoning = "".join(self._reasoning_log)
        content = "".join(self._content_log)
        return ReasoningOutput(reasoning or None, content or None)

    def _advance(self) -> ReasoningDelta:
        reasoning: list[str] = []
        content: list[str] = []
        if self._state == "start":
            self._decide_start()
        if self._state == "reasoning":
            reasoning.append(self._take_reasoning())
        if self._state == "content":
            content.append(self._take_content())
        delta = ReasoningDelta("".join(reasoning), "".join(content))
        self._reasoning_log.append(delta.reasoning_content)
        self._content_log.append(delta.content)
        return delta

    def _decide_start(self) -> None:
        head = self._buffer.lstrip()
        if head.startswith(THINK_OPEN):
            self._buffer = head[len(THINK_OPEN) :]
            self._state = "reasoning"
        elif THINK_OPEN.startswith(head) and not self._finished:
            return  # blank so far, or a start of the tag: wait
        else:
            self._state = "reasoning" if self._starts_in_reasoning else "content"

    def _take_reasoning(self) -> str:
        """Reasoning up to ``</think>`` (moving on to content there) or up to what must wait."""
        text = self._buffer
        end = text.find(THINK_CLOSE)
        if end >= 0:
            self._buffer = text[end + len(THINK_CLOSE) :]
            self._state = "content"
            self._after_close = True
            return self._reasoning_text(text[:end].rstrip())
        if self._finished:
            self._buffer = ""
            return self._reasoning_text(text.rstrip())
        # Hold a tail that may start the close tag, and trailing blanks that may precede it.
        keep = _partial_tail(text, THINK_CLOSE)
        body = text[: len(text) - keep].rstrip()
        self._buffer = text[len(body) :]
        return self._reasoning_text(body)

    def _reasoning_text(self, text: str) -> str:
        if not self._reasoning_started:
            text = text.lstrip()
            self._reasoning_started = bool(text)
        return text

    def _take_content(self) -> str:
        text, self._buffer = self._buffer, ""
        if self._after_close:
            text = text.lstrip()
            self._after_close = not text
        return text


class ReasoningParser:
    """A reasoning format: which output starts inside the reasoning."""

    name: ClassVar[str]
    starts_in_reasoning_by_default: ClassVar[bool]

    def __init__(self, starts_in_reasoning: bool | None = None) -> None:
        """``starts_in_reasoning`` overrides the format's default: True when the prompt
        itself opened the reasoning block (see ``prompt_opens_reasoning``)."""
        if starts_in_reasoning is None:
            starts_in_reasoning = self.starts_in_reasoning_by_default
        self.starts_in_reasoning = starts_in_reasoning

    def stream(self) -> ReasoningStream:
        """A fresh stream for one generation (one per choice)."""
        return ReasoningStream(self.starts_in_reasoning)

    def parse(self, text: str) -> ReasoningOutput:
        """Reasoning and content of a whole output."""
        s = self.stream()
        s.feed(text)
        s.finish()
        return s.result()


class DeepSeekR1ReasoningParser(ReasoningParser):
    """Output starts inside the reasoning; an opening ``<think>`` is optional."""

    name = "deepseek_r1"
    starts_in_reasoning_by_default = True


class Qwen3ReasoningParser(ReasoningParser):
    """Reasoning only when the output opens with ``<think>``."""

    name = "qwen3"
    starts_in_reasoning_by_default = False


_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}


def reasoning_parser_names() -> list[str]:
    """The names ``get_reasoning_parser`` takes, sorted."""
    return sorted(_PARSERS)


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The reasoning parser class called ``name``; ValueError for none."""
    cls = _PARSERS.get(name)
    if cls is None:
        raise ValueError(
            f"unknown reasoning parser {name!r}; choose one of {', '.join(reasoning_parser_names())}"
        )
    return cls


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open ``<think>`` block, so that the output
    starts inside the reasoning."""
    opened = prompt.rfind(THINK_OPEN)
    return opened > prompt.rfind(THINK_CLOSE) and not prompt[opened + len(THINK_OPEN) :].strip()


def _partial_tail(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
