"""Reading text that arrives in pieces, for grammars written as generators.

A grammar is a generator over a ``Cursor``: each primitive here (``yield from cur.expect(...)``)
returns as soon as the text received so far decides its answer, and otherwise yields, which
suspends the whole grammar until the next piece arrives. Once ``done`` is set no more text
comes, so no primitive yields again: each decides on what there is. A primitive that fails
consumes nothing, so a caller can back out to where it started.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import TypeAlias, TypeVar

from tessera.serve.tool_parsers.json_scan import JsonScanner, ScanStatus

T = TypeVar("T")
Step: TypeAlias = Generator[None, None, T]
"""A grammar step: yields while it waits for more text, then returns its result."""

_WHITESPACE = " \t\r\n"


class Cursor:
    """The text received so far, the read position in it, and whether more can come."""

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0
        self.done = False

    def peek(self) -> str:
        """The character at the read position, or "" when there is none yet."""
        return self.text[self.pos : self.pos + 1]

    def trim(self) -> None:
        """Forget the text before the read position (positions held elsewhere go stale)."""
        self.text = self.text[self.pos :]
        self.pos = 0

    def wait(self, num_chars: int) -> Step[bool]:
        """Whether ``num_chars`` characters beyond the read position arrive."""
        while len(self.text) - self.pos < num_chars:
            if self.done:
                return False
            yield
        return True

    def skip_ws(self) -> Step[None]:
        """Skip whitespace up to the next other character (or the end of the text)."""
        while True:
            n = len(self.text)
            while self.pos < n and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < n or self.done:
                return
            yield

    def at(self, literal: str) -> Step[bool]:
        """Whether ``literal`` follows the read position (consumes nothing)."""
        while True:
            seen = self.text[self.pos : self.pos + len(literal)]
            if seen == literal:
                return True
            if self.done or not literal.startswith(seen):
                return False
            yield

    def expect(self, literal: str) -> Step[bool]:
        """Consume ``literal`` if it follows the read position."""
        found = yield from self.at(literal)
        if found:
            self.pos += len(literal)
        return found

    def one_of(self, *literals: str) -> Step[str | None]:
        """Consume and return the first of ``literals`` that follows, or None."""
        for literal in literals:
            if (yield from self.expect(literal)):
                return literal
        return None

    def read_until(self, markers: tuple[str, ...], max_chars: int) -> Step[tuple[str, str] | None]:
        """The text before the first of ``markers`` and that marker, both consumed.

        None when none comes within ``max_chars`` characters: a bound, so that prose that
        merely follows a marker is not held back waiting for one.
        """
        while True:
            best: tuple[int, str] | None = None
            for marker in markers:
                i = self.text.find(marker, self.pos, self.pos + max_chars + len(marker))
                if i >= 0 and (best is None or i < best[0]):
                    best = (i, marker)
            if best is not None:
                i, marker = best
                found = self.text[self.pos : i]
                self.pos = i + len(marker)
                return found, marker
            if self.done or len(self.text) - self.pos > max_chars + max(map(len, markers)):
                return None
            yield

    def skip_through(self, marker: str) -> Step[None]:
        """Skip past the next ``marker``, or to the end of the text when none comes."""
        while True:
            i = self.text.find(marker, self.pos)
            if i >= 0:
                self.pos = i + len(marker)
                return
            # Keep a tail that may be the start of the marker.
            self.pos = max(self.pos, len(self.text) - len(marker) + 1)
            if self.done:
                self.pos = len(self.text)
                return
            yield

    def json_value(self) -> Step[str | None]:
        """Consume one JSON value of any kind and return its text; None if it is invalid or
        cut off (the cursor then stays where it was)."""
        start = self.pos
        scanner = JsonScanner()
        end = start
        while True:
            end, status = scanner.scan(self.text, end, self.done)
            if status is ScanStatus.COMPLETE:
                raw = self.text[start:end]
                try:
                    json.loads(raw)
                except ValueError:
                    return None
                self.pos = end
                return raw
            if status is ScanStatus.INVALID or self.done:
                return None
            yield

    def json_string(self) -> Step[str | None]:
        """Consume a JSON string and return its decoded text; None if none follows."""
        if not (yield from self.at('"')):
            return None
        start = self.pos
        raw = yield from self.json_value()
        if raw is None:
            return None
        value = json.loads(raw)
        if not isinstance(value, str):
            self.pos = start
            return None
        return value
