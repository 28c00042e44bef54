"""Where one JSON value ends, in text that arrives in pieces.

Streaming a call's arguments needs to know, before the value is complete, that each character
still belongs to it. The scanner tracks only what decides that: the nesting of objects and
arrays, whether it is inside a string, and an escape in progress. It refuses a character that
can never appear outside a string (say the ``<`` of a closing marker in unbalanced arguments)
as soon as it sees it; finer errors (``{"a" 1}``) are left to ``json.loads`` on the whole value.
"""

from __future__ import annotations

import re
from enum import Enum

# Outside strings a value holds only structure, numbers and the letters of true/false/null.
_STRUCTURE = frozenset("{}[],:")
_SCALAR = frozenset("0123456789+-.eEtrufalsn")
_WHITESPACE = frozenset(" \t\r\n")
# Inside a string only these end a run of ordinary characters; control characters are invalid.
_STRING_STOP = re.compile(r'["\\\x00-\x1f]')
_CLOSER = {"{": "}", "[": "]"}


class ScanStatus(Enum):
    MORE = "more"
    """Everything so far belongs to the value, which is not complete yet."""
    COMPLETE = "complete"
    INVALID = "invalid"


class JsonScanner:
    """Scans one JSON value from its first character; feed it the same growing text."""

    def __init__(self) -> None:
        self._closers: list[str] = []
        self._started = False
        self._in_string = False
        self._escaped = False
        self._bare_scalar = False
        """A top-level number or literal: it ends at the first character not part of it."""

    def scan(self, text: str, start: int, final: bool) -> tuple[int, ScanStatus]:
        """Consume ``text[start:]``; ``final`` says no more text will come.

        Returns ``(end, status)``: ``text[start:end]`` belongs to the value. On COMPLETE the
        value ends at ``end``; on INVALID ``text[end]`` is the offending character; on MORE
        ``end == len(text)``. Call again with the longer text from ``end``.
        """
        i = start
        n = len(text)
        while i < n:
            if self._in_string:
                i = self._scan_string(text, i)
                if i < 0:
                    return -i - 1, ScanStatus.INVALID
                if not self._in_string and not self._closers:
                    return i, ScanStatus.COMPLETE
                continue
            c = text[i]
            if not self._started:
                self._started = True
                if c == '"':
                    self._in_string = True
                    i += 1
                    continue
                if c in _SCALAR:
                    self._bare_scalar = True
                elif c not in _CLOSER:
                    return i, ScanStatus.INVALID
            if self._bare_scalar:
                if c not in _SCALAR:
                    return i, ScanStatus.COMPLETE
            elif c in _CLOSER:
                self._closers.append(_CLOSER[c])
            elif c in "}]":
                if not self._closers or self._closers.pop() != c:
                    return i, ScanStatus.INVALID
                if not self._closers:
                    return i + 1, ScanStatus.COMPLETE
            elif c == '"':
                self._in_string = True
            elif c not in _STRUCTURE and c not in _SCALAR and c not in _WHITESPACE:
                return i, ScanStatus.INVALID
            i += 1
        if self._bare_scalar and final:
            return n, ScanStatus.COMPLETE
        return n, ScanStatus.MORE

    def _scan_string(self, text: str, i: int) -> int:
        """Advance inside a string from ``i``; the index reached, or ``-(bad index) - 1``."""
        if self._escaped:
            self._escaped = False
            return i + 1
        m = _STRING_STOP.search(text, i)
        if m is None:
            return len(text)
        j = m.start()
        c = text[j]
        if c == '"':
            self._in_string = False
        elif c == "\\":
            self._escaped = True
        else:
            return -j - 1
        return j + 1
