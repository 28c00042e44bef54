"""What a request asks its output to follow; validated once at the edge, hashable for caches.

Names follow vLLM's ``StructuredOutputsParams``: exactly one of ``json`` (a JSON schema),
``json_object`` (any JSON object), ``regex``, ``choice`` (one of some strings) or ``grammar``
(Lark, or GBNF as llama.cpp writes it).
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass
from typing import Any

MAX_SPEC_CHARS = 256 * 1024
"""Largest schema, regex or grammar text: a bound on what compiling one may cost."""
MAX_CHOICES = 1024


@dataclass(frozen=True)
class StructuredOutputs:
    """One request's output constraint. ``json`` is the schema as JSON text (a dict given to
    the constructor is serialized with sorted keys, so equal schemas share a cache entry)."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    strict: bool = True
    """For ``json``: refuse schema keywords the grammar engine does not enforce (OpenAI's
    ``strict``); False ignores them, so the output follows the rest of the schema."""

    def __post_init__(self) -> None:
        if isinstance(self.json, dict | bool):
            object.__setattr__(self, "json", _json.dumps(self.json, sort_keys=True))
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError(
                "structured outputs need exactly one of json, json_object, regex, choice or "
                f"grammar, got {', '.join(kinds) or 'none'}"
            )
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise ValueError(f"structured outputs: {name} must be a non-empty string")
            if len(value) > MAX_SPEC_CHARS:
                raise ValueError(
                    f"structured outputs: {name} is {len(value)} characters; at most "
                    f"{MAX_SPEC_CHARS} are allowed"
                )
        if self.json is not None:
            try:
                schema = _json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured outputs: json is not valid JSON ({e})") from None
            if not isinstance(schema, dict | bool):
                raise ValueError("structured outputs: a JSON schema must be an object")
        if self.choice is not None:
            if not 1 <= len(self.choice) <= MAX_CHOICES:
                raise ValueError(
                    f"structured outputs: choice needs 1 to {MAX_CHOICES} strings, "
                    f"got {len(self.choice)}"
                )
            if any(not isinstance(c, str) or not c for c in self.choice):
                raise ValueError("structured outputs: choice must be non-empty strings")
            if sum(len(c) for c in self.choice) > MAX_SPEC_CHARS:
                raise ValueError("structured outputs: the choices are too long in all")

    @property
    def kind(self) -> str:
        """Which constraint this is: json, json_object, regex, choice or grammar."""
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool, strict: bool = True) -> StructuredOutputs:
        return cls(json=_json.dumps(schema, sort_keys=True), strict=strict)
