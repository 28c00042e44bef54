"""The interface of a tool-call parser: one per output format, selected by name."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar

from tessera.serve.tool_parsers.cursor import Step
from tessera.serve.tool_parsers.stream import ToolCallStream
from tessera.serve.tool_parsers.types import ParsedOutput, openai_call_id

# Function names as models write them: OpenAI's letters, digits, ``_`` and ``-``, plus the
# dots of namespaced names. Anything else (spaces, quotes) is prose, not a name.
_NAME = re.compile(r"[\w.\-]{1,256}")


class ToolParser(ABC):
    """Turns a model's output in one format into content and OpenAI-style tool calls.

    ``parse`` takes a whole output; ``stream`` starts a ``ToolCallStream`` that takes it in
    pieces. For a well-formed output both give the same content and calls; see ``stream.py``
    for what each does with a malformed one.

    ``tool_names``, the names of the request's tools, makes a call of any other name not a
    call: its text stays content, in both modes alike. Without it any name is accepted, and
    the server may check names afterwards with ``unknown_tool_calls``.
    """

    name: ClassVar[str]
    """The name the server's ``--tool-call-parser`` selects this parser by."""
    entry_markers: ClassVar[tuple[str, ...]]
    """Text that opens a region of tool calls wherever it appears in the output."""
    bare_json_start: ClassVar[bool] = False
    """Whether an output that starts with ``{`` (after whitespace) opens a region too."""

    def __init__(self, tool_names: Iterable[str] | None = None) -> None:
        self.tool_names = frozenset(tool_names) if tool_names is not None else None

    def accepts(self, name: str) -> bool:
        """Whether a call of ``name`` is a call (else its text is content)."""
        if _NAME.fullmatch(name) is None:
            return False
        return self.tool_names is None or name in self.tool_names

    def new_call_id(self, name: str, index: int) -> str:
        """A fresh id for the call ``index`` (0-based in this output) of ``name``."""
        return openai_call_id()

    @abstractmethod
    def region(self, s: ToolCallStream, marker: str) -> Step[int | None]:
        """Parse a region of tool calls, from just after its ``marker`` ("" for a bare JSON
        start) at ``s.region_start``, reading through ``s.cur`` and sending calls through
        ``s.call`` or ``s.complete_call``.

        Returns None when the text up to the cursor was the region; otherwise where content
        resumes, which is ``s.region_start`` (or before it) when nothing was a call. After a
        call comes back BROKEN the grammar skips what belongs to it and returns.
        """

    def stream(self) -> ToolCallStream:
        """A fresh stream for one generation (one per choice)."""
        return ToolCallStream(self)

    def parse(self, text: str) -> ParsedOutput:
        """Content and tool calls of a whole output; a malformed call's text is content."""
        s = self.stream()
        s.feed(text)
        s.finish()
        return s.result()
