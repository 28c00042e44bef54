"""Tokenizer loading and incremental detokenization (for stop strings and streaming)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class TokenizerError(ValueError):
    """The model's tokenizer is missing or unusable for this request."""


def encode_prompt(tokenizer: Any | None, prompt: str) -> list[int]:
    """The token ids of ``prompt``; TokenizerError when the model has no tokenizer."""
    if tokenizer is None:
        raise TokenizerError(
            "this model directory has no tokenizer; pass prompts as token-id lists"
        )
    return list(tokenizer.encode(prompt))


def load_tokenizer(model_dir: str) -> Any | None:
    """The directory's tokenizer, or None when it ships none (token-id prompts still work)."""
    path = Path(model_dir)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise TokenizerError(f"cannot load the tokenizer in {model_dir!r}: {e}") from e


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one step at a time.

    Decoding a token alone can split a multi-byte character or lose a leading space, so each
    step decodes a short window that starts a few tokens back and emits only the part after
    what that window decoded to before (the approach vLLM and TGI use).
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.prefix_offset = max(len(prompt_ids) - 5, 0)
        self.read_offset = len(prompt_ids)
        self.text = ""

    def step(self, token_ids: list[int], num_tokens: int | None = None) -> str:
        """Append the text of tokens added since the last call, up to the first
        ``num_tokens`` of ``token_ids`` (default: all); returns the new text."""
        decode = self.tokenizer.decode
        end = len(token_ids) if num_tokens is None else num_tokens
        prefix: str = decode(token_ids[self.prefix_offset : self.read_offset],
                             skip_special_tokens=True)
        full: str = decode(token_ids[self.prefix_offset : end], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete character: wait for more tokens
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, end
        self.text += delta
        return delta


def find_stop(text: str, num_new_chars: int, stops: list[str]) -> int:
    """Index of the earliest stop string that ends in the last ``num_new_chars`` characters,
    or -1."""
    best = -1
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best == -1 or idx < best):
            best = idx
    return best
