"""Tool-call parsers by name, and a guess of the name from a model's chat template."""

from __future__ import annotations

from tessera.serve.tool_parsers import deepseek_v3, kimi_k2, llama3_json, mistral
from tessera.serve.tool_parsers.base import ToolParser
from tessera.serve.tool_parsers.deepseek_v3 import DeepSeekV3ToolParser
from tessera.serve.tool_parsers.hermes import HermesToolParser
from tessera.serve.tool_parsers.kimi_k2 import KimiK2ToolParser
from tessera.serve.tool_parsers.llama3_json import Llama3JsonToolParser
from tessera.serve.tool_parsers.mistral import MistralToolParser

_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls
    for cls in (
        HermesToolParser,
        Llama3JsonToolParser,
        MistralToolParser,
        DeepSeekV3ToolParser,
        KimiK2ToolParser,
    )
}
_ALIASES = {"qwen": "hermes", "qwen25": "hermes", "qwen3": "hermes", "llama3": "llama3_json"}

# What a template writes when it renders a call, most specific first: Qwen's and Hermes'
# ``<tool_call>`` is the most generic, so it is tried last.
_TEMPLATE_SIGNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("deepseek_v3", (deepseek_v3.CALLS_BEGIN, deepseek_v3.CALL_BEGIN)),
    ("kimi_k2", (kimi_k2.SECTION_BEGIN, kimi_k2.CALL_BEGIN)),
    ("mistral", (mistral.TOOL_CALLS, mistral.ARGS)),
    ("llama3_json", (llama3_json.PYTHON_TAG,)),
    ("hermes", ("<tool_call>",)),
)


def tool_parser_names() -> list[str]:
    """The names ``get_tool_parser`` takes (aliases aside), sorted."""
    return sorted(_PARSERS)


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class called ``name`` (or one of its aliases); ValueError for none."""
    cls = _PARSERS.get(_ALIASES.get(name, name))
    if cls is None:
        raise ValueError(
            f"unknown tool-call parser {name!r}; choose one of {', '.join(tool_parser_names())}"
        )
    return cls


def detect_tool_parser(chat_template: str) -> str | None:
    """The name of the parser for the format ``chat_template`` renders calls in, or None.

    A guess from the markers the template writes; Llama 3's templates may lack
    ``<|python_tag|>``, so their ``"parameters"`` key next to Llama's header tokens counts too.
    """
    for name, signs in _TEMPLATE_SIGNS:
        if any(sign in chat_template for sign in signs):
            return name
    if '"parameters"' in chat_template and "<|start_header_id|>" in chat_template:
        return "llama3_json"
    return None
