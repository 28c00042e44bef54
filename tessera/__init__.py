"""Tessera: an LLM serving engine built to split models into attention and FFN units.

Top-level names load lazily, so pure-Python parts (scheduler, block manager, simulator) can be
imported without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tessera.llm import LLM
    from tessera.outputs import CompletionOutput, RequestOutput
    from tessera.sampling_params import SamplingParams
    from tessera.structured.spec import StructuredOutputs

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "StructuredOutputs"]

_EXPORTS = {
    "LLM": "tessera.llm",
    "CompletionOutput": "tessera.outputs",
    "RequestOutput": "tessera.outputs",
    "SamplingParams": "tessera.sampling_params",
    "StructuredOutputs": "tessera.structured.spec",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tessera' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
