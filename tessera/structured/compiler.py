"""Grammars compiled off the step loop and cached by their text.

The engine asks for a request's grammar when the request arrives (``submit``) and schedules
the request once it is compiled, so a slow schema never stalls a step. llguidance drops the
GIL while it compiles, so the compiling thread runs beside the step loop. A compiled matcher
is kept per grammar; each constrained sequence gets a copy (``matcher``), which is cheap.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import llguidance.hf

from tessera.structured.grammar import GrammarError, check_grammar
from tessera.structured.spec import StructuredOutputs

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 512


def grammar_tokenizer(tokenizer: Any, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face tokenizer over a model's ``vocab_size`` logits.

    Byte-level BPE and SentencePiece tokenizers are read whole by llguidance; any other (the
    demo model's character-level one) is described token by token: each id's text as bytes.
    """
    eos = tokenizer.eos_token_id
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
    except ValueError:
        pass
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces = []
    for i in range(vocab_size):
        if i in special or i >= len(tokenizer):
            pieces.append(b"")
        else:
            pieces.append(tokenizer.decode([i]).encode())

    class _ByPiece:
        eos_token_id = eos
        bos_token_id = tokenizer.bos_token_id
        tokens = pieces
        special_token_ids = sorted(special)

        def __call__(self, text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False))

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByPiece()), n_vocab=vocab_size)


class GrammarCompiler:
    """Compiles ``StructuredOutputs`` for one model's tokenizer; thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        """``tokenizer``: the model's Hugging Face tokenizer (None: structured outputs are
        refused); ``vocab_size``: the number of logits, which may exceed the tokenizer's."""
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[StructuredOutputs, llguidance.LLMatcher] = OrderedDict()
        self._pending: dict[StructuredOutputs, Future[None]] = {}
        self._pool: ThreadPoolExecutor | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                if self._hf_tokenizer is None:
                    raise GrammarError("structured output", "this model has no tokenizer")
                self._tokenizer = grammar_tokenizer(self._hf_tokenizer, self.vocab_size)
            return self._tokenizer

    def check(self, spec: StructuredOutputs) -> None:
        """Raise ``GrammarError`` naming the problem if ``spec`` cannot be compiled (fast: no
        token tables are built)."""
        check_grammar(spec, None)

    def is_ready(self, spec: StructuredOutputs) -> bool:
        with self._lock:
            return spec in self._compiled

    def submit(self, spec: StructuredOutputs) -> Future[None]:
        """Compile ``spec`` in the background (once, however many ask); the future is done
        when ``matcher(spec)`` will not compile. It raises ``GrammarError`` if compiling fails."""
        with self._lock:
            if spec in self._compiled:
                done: Future[None] = Future()
                done.set_result(None)
                return done
            future = self._pending.get(spec)
            if future is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="tessera-grammar")
                future = self._pool.submit(self._compile, spec)
                self._pending[spec] = future
            return future

    def matcher(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        """A fresh matcher at the start of ``spec``'s grammar (compiled now if not yet)."""
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is not None:
                self._compiled.move_to_end(spec)
                return compiled.deep_copy()
        self._compile(spec)
        return self.matcher(spec)

    def _compile(self, spec: StructuredOutputs) -> None:
        try:
            tokenizer = self.tokenizer
            matcher = llguidance.LLMatcher(tokenizer, check_grammar(spec, tokenizer))
            if matcher.is_error():
                raise GrammarError(spec.kind, matcher.get_error())
            with self._lock:
                self._compiled[spec] = matcher
                while len(self._compiled) > MAX_CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
        finally:
            with self._lock:
                self._pending.pop(spec, None)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
