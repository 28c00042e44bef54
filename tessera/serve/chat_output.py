"""One chat choice's generated text as OpenAI's message: reasoning, content and tool calls.

A ``ChoiceShaper`` takes the text as it is generated (``feed``, then ``finish``) and returns
the ``delta`` objects of stream chunks; ``message`` is the whole message of a non-streamed
response. Reasoning is split first (``--reasoning-parser``), then the answer is parsed for
tool calls as the request's ``ToolPlan`` says.
"""

from __future__ import annotations

from typing import Any

from tessera.serve.reasoning import ReasoningParser, ReasoningStream
from tessera.serve.tool_calls import ToolPlan, forced_calls
from tessera.serve.tool_parsers import ToolCall, ToolCallStream
from tessera.serve.tool_parsers.types import openai_call_id

Delta = dict[str, Any]


class ChoiceShaper:
    def __init__(self, plan: ToolPlan, reasoning: ReasoningParser | None) -> None:
        """``reasoning``: the parser of the model's reasoning, None for none (the caller
        passes None for JSON-constrained output, which has no room for reasoning)."""
        self.plan = plan
        self._reasoning: ReasoningStream | None = (
            reasoning.stream() if reasoning is not None else None)
        self._tools: ToolCallStream | None = (
            plan.parser.stream() if plan.mode == "auto" and plan.parser is not None else None
        )
        self._reasoning_parts: list[str] = []
        self._content_parts: list[str] = []
        self._forced_text: list[str] = []
        self._named_id: str | None = None
        self.tool_calls: list[ToolCall] = []

    def feed(self, text: str) -> list[Delta]:
        """The stream deltas ``text`` completes (possibly none: text held back)."""
        return self._take(text, final=False)

    def finish(self) -> list[Delta]:
        """End the choice; the deltas of what was held back."""
        return self._take("", final=True)

    def _take(self, text: str, final: bool) -> list[Delta]:
        deltas: list[Delta] = []
        if self.plan.mode in ("required", "named"):
            return self._take_forced(text, final)
        answer = text
        if self._reasoning is not None:
            r = self._reasoning.finish() if final else self._reasoning.feed(text)
            if r.reasoning_content:
                self._reasoning_parts.append(r.reasoning_content)
                deltas.append({"reasoning_content": r.reasoning_content})
            answer = r.content
        if self._tools is not None:
            pieces = self._tools.feed(answer) if answer else []
            if final:
                pieces += self._tools.finish()
            for piece in pieces:
                if piece.content:
                    self._content_parts.append(piece.content)
                deltas.append(piece.to_openai())
            if final:
                self.tool_calls = self._tools.result().tool_calls
        elif answer:
            self._content_parts.append(answer)
            deltas.append({"content": answer})
        return [d for d in deltas if d.get("tool_calls") or any(d.values())]

    def _take_forced(self, text: str, final: bool) -> list[Delta]:
        self._forced_text.append(text)
        if self.plan.mode == "named":
            # The output is the arguments object: stream it as the one call's arguments.
            deltas: list[Delta] = []
            if self._named_id is None:
                self._named_id = openai_call_id()
                deltas.append({"tool_calls": [{
                    "index": 0, "id": self._named_id, "type": "function",
                    "function": {"name": self.plan.function, "arguments": ""}}]})
            if text:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            if final:
                self._end_forced()
            return deltas
        if not final:
            return []  # an array of calls: sent whole when complete
        self._end_forced()
        if not self.tool_calls:
            return [{"content": "".join(self._content_parts)}] if self._content_parts else []
        return [
            {"tool_calls": [{"index": i, "id": c.id, "type": "function",
                             "function": {"name": c.name, "arguments": c.arguments}}]}
            for i, c in enumerate(self.tool_calls)
        ]

    def _end_forced(self) -> None:
        text = "".join(self._forced_text)
        calls = forced_calls(self.plan, text)
        if calls is None:
            self._content_parts.append(text)
            return
        if self._named_id is not None and calls:
            calls[0] = ToolCall(self._named_id, calls[0].name, calls[0].arguments)
        self.tool_calls = calls

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's reason: ``tool_calls`` when the choice ended normally with calls."""
        return "tool_calls" if reason == "stop" and self.tool_calls else reason

    def message(self) -> dict[str, Any]:
        """The non-streamed ``message`` (after ``finish``)."""
        content = "".join(self._content_parts)
        message: dict[str, Any] = {"role": "assistant",
                                   "content": content if content or not self.tool_calls else None}
        if self._reasoning is not None:
            message["reasoning_content"] = "".join(self._reasoning_parts) or None
        if self.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return message
