"""The streaming state machine every tool-call format runs on.

Text outside tool calls is content. A format names the markers that may open a region of tool
calls (``<tool_call>``, ``[TOOL_CALLS]``, ...) and parses a region with a grammar (a generator,
see ``cursor.py``). The stream looks for those markers in the content, holding back a tail
that may be the start of one, and hands each region to the grammar.

A call is sent in two stages. Its header (index, id, name) goes out once the name is known and
its arguments have started with ``{``; from then on the argument text goes out as it arrives.
Until the header is sent nothing of the region has gone out, so a region the grammar rejects
(prose that merely contains a marker, bad JSON before the arguments) is released as content,
exactly as the non-streamed parse gives it. A call that fails after its header (arguments
that are invalid or cut off) cannot be taken back: the stream leaves it as sent, while the
non-streamed parse returns its text as content. Either way nothing raises.

Whitespace between a tool call and the content around it is not content: trailing whitespace
of content is held back until more content follows, and dropped if a call follows instead.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from tessera.serve.tool_parsers.cursor import Cursor, Step
from tessera.serve.tool_parsers.json_scan import JsonScanner, ScanStatus
from tessera.serve.tool_parsers.types import ParsedOutput, StreamDelta, ToolCall, ToolCallDelta


class Outcome(Enum):
    """How a grammar's attempt at one call ended."""

    REJECTED = "rejected"
    """Not a call; nothing of it was sent, so its text is content."""
    DONE = "done"
    BROKEN = "broken"
    """The header (and maybe some arguments) went out, then the call turned out unusable."""


class Format(Protocol):
    """What the stream needs of a format (``ToolParser`` in ``base.py`` documents each)."""

    @property
    def entry_markers(self) -> tuple[str, ...]: ...
    @property
    def bare_json_start(self) -> bool: ...
    def accepts(self, name: str) -> bool: ...
    def new_call_id(self, name: str, index: int) -> str: ...
    def region(self, s: ToolCallStream, marker: str) -> Step[int | None]: ...


@dataclass(slots=True)
class _OpenCall:
    index: int
    id: str
    name: str
    start: int
    dropped_ws: str
    """Content whitespace dropped when the call began; restored if the call breaks."""
    arguments: list[str] = field(default_factory=list)


class ToolCallStream:
    """Parses one generation fed in pieces of any size: ``feed`` each piece, then ``finish``."""

    def __init__(self, parser: Format) -> None:
        self._parser = parser
        self.cur = Cursor()
        self.region_start = 0
        """Where the region being parsed starts (its marker included)."""
        self._deltas: list[StreamDelta] = []
        self._content_log: list[str] = []
        self._calls: list[ToolCall] = []
        self._used_ids: set[str] = set()
        self._num_started = 0
        self._open: _OpenCall | None = None
        self._pending_ws = ""
        self._after_call = False
        self._finished = False
        self._run: Generator[None, None, None] = self._content_loop()

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls completed so far, well-formed ones only."""
        return list(self._calls)

    @property
    def num_calls_started(self) -> int:
        """Calls whose header has been sent (what decides ``finish_reason: tool_calls``)."""
        return self._num_started

    def feed(self, text: str) -> list[StreamDelta]:
        """Take the next piece of generated text; the deltas it completes, in order."""
        if self._finished:
            raise RuntimeError("feed after finish")
        self.cur.text += text
        self._advance()
        return self._take_deltas()

    def finish(self) -> list[StreamDelta]:
        """End the generation: release what was held back; the last deltas."""
        if not self._finished:
            self._finished = True
            self.cur.done = True
            self._advance()
            self._emit_content(self._pending_ws)
            self._pending_ws = ""
        return self._take_deltas()

    def result(self) -> ParsedOutput:
        """The whole output as a non-streamed response gives it (after ``finish``)."""
        content = "".join(self._content_log)
        return ParsedOutput(content=content or None, tool_calls=list(self._calls))

    # The interface grammars use.

    def accepts(self, name: str) -> bool:
        """Whether ``name`` may be called (see ``ToolParser.accepts``)."""
        return self._parser.accepts(name)

    def call(self, name: str, call_id: str | None, start: int) -> Step[Outcome]:
        """Stream the call ``name`` whose arguments, a JSON object, follow the cursor (after
        whitespace); ``start`` is where the call's text starts. ``call_id`` is one the model
        wrote, or None for a fresh one."""
        cur = self.cur
        yield from cur.skip_ws()
        if not (yield from cur.wait(1)) or cur.peek() != "{" or not self.accepts(name):
            return Outcome.REJECTED
        self._begin(name, call_id, start)
        scanner = JsonScanner()
        while True:
            end, status = scanner.scan(cur.text, cur.pos, cur.done)
            if end > cur.pos:
                self._emit_arguments(cur.text[cur.pos : end])
                cur.pos = end
            if status is ScanStatus.COMPLETE:
                return self._end()
            if status is ScanStatus.INVALID or cur.done:
                return Outcome.BROKEN
            yield

    def complete_call(self, name: str, call_id: str | None, start: int, arguments: str) -> Outcome:
        """Send a call whose arguments were read whole (DONE), or REJECTED if unusable."""
        if not self.accepts(name) or not _is_json_object(arguments):
            return Outcome.REJECTED
        self._begin(name, call_id, start)
        self._emit_arguments(arguments)
        return self._end()

    # Internals.

    def _advance(self) -> None:
        # The grammar runs until it waits for more text; it returns once the text is done.
        next(self._run, None)

    def _content_loop(self) -> Step[None]:
        cur = self.cur
        markers = self._parser.entry_markers
        if self._parser.bare_json_start:
            # An output that is a bare JSON object from its first non-blank character.
            while not cur.text.lstrip() and not cur.done:
                yield
            if cur.text.lstrip().startswith("{"):
                yield from self._region(0, "")
        while True:
            found = _find_first(cur.text, cur.pos, markers)
            if found is not None:
                at, marker = found
                self._content(cur.text[cur.pos : at])
                cur.pos = at + len(marker)
                yield from self._region(at, marker)
                continue
            end = len(cur.text) if cur.done else len(cur.text) - _partial_tail(cur.text, markers)
            self._content(cur.text[cur.pos : max(end, cur.pos)])
            cur.pos = max(end, cur.pos)
            if cur.done:
                return
            cur.trim()  # no position outside the cursor is live between regions
            yield

    def _region(self, start: int, marker: str) -> Step[None]:
        self.region_start = start
        calls_before = self._num_started
        resume = yield from self._parser.region(self, marker)
        if self._open is not None:
            self._close_broken()
        if resume is not None:
            if resume <= start:  # nothing here was a call: the marker is content
                self._content(marker)
                self.cur.pos = start + len(marker)
            else:
                self.cur.pos = resume
        if self._num_started > calls_before:
            self._after_call = True

    def _begin(self, name: str, call_id: str | None, start: int) -> None:
        assert self._open is None, "a grammar goes on after a broken call"
        index = self._num_started
        # Only a model-written id collides with a fresh one: counting up past the ids in use
        # ends the search even for a format whose fresh ids are not random.
        attempt = index
        while call_id is None or call_id in self._used_ids:
            call_id = self._parser.new_call_id(name, attempt)
            attempt += 1
        self._used_ids.add(call_id)
        self._num_started += 1
        self._open = _OpenCall(index, call_id, name, start, self._pending_ws)
        self._pending_ws = ""
        self._after_call = False
        self._deltas.append(StreamDelta(tool_call=ToolCallDelta(index, id=call_id, name=name)))

    def _end(self) -> Outcome:
        call = self._open
        assert call is not None
        arguments = "".join(call.arguments)
        if not _is_json_object(arguments):
            return Outcome.BROKEN
        self._calls.append(ToolCall(call.id, call.name, arguments))
        self._open = None
        return Outcome.DONE

    def _close_broken(self) -> None:
        call = self._open
        assert call is not None
        self._content_log.append(call.dropped_ws + self.cur.text[call.start : self.cur.pos])
        self._open = None

    def _content(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        body = text.rstrip()
        if not body:
            self._pending_ws += text
            return
        self._emit_content(self._pending_ws + body)
        self._pending_ws = text[len(body) :]

    def _emit_content(self, text: str) -> None:
        if not text:
            return
        self._content_log.append(text)
        last = self._deltas[-1] if self._deltas else None
        if last is not None and last.content is not None:
            self._deltas[-1] = StreamDelta(content=last.content + text)
        else:
            self._deltas.append(StreamDelta(content=text))

    def _emit_arguments(self, text: str) -> None:
        call = self._open
        assert call is not None
        call.arguments.append(text)
        last = self._deltas[-1].tool_call if self._deltas else None
        if last is not None and last.index == call.index and last.name is None:
            merged = (last.arguments or "") + text
            self._deltas[-1] = StreamDelta(tool_call=ToolCallDelta(call.index, arguments=merged))
        else:
            self._deltas.append(StreamDelta(tool_call=ToolCallDelta(call.index, arguments=text)))

    def _take_deltas(self) -> list[StreamDelta]:
        deltas, self._deltas = self._deltas, []
        return deltas


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _find_first(text: str, start: int, markers: tuple[str, ...]) -> tuple[int, str] | None:
    """The earliest marker at or after ``start`` (the longest one on a tie)."""
    best: tuple[int, str] | None = None
    for marker in markers:
        i = text.find(marker, start)
        if i >= 0 and (
            best is None or i < best[0] or (i == best[0] and len(marker) > len(best[1]))
        ):
            best = (i, marker)
    return best


def _partial_tail(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that is a proper start of some marker."""
    longest = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:k]):
                longest = k
                break
    return longest
