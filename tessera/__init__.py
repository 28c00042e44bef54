"""Tessera: an LLM serving engine built to split models into attention and FFN units."""

__version__ = "0.1.0"
