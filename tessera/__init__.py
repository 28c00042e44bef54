"""Tessera: an LLM serving engine built to split models into attention and FFN units."""

from tessera.llm import LLM
from tessera.outputs import CompletionOutput, RequestOutput
from tessera.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
