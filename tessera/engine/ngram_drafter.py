"""Prompt-lookup drafting: model-free speculation from a sequence's own tokens. Pure Python.

A decoding sequence's last n tokens (n from ``prompt_lookup_max`` down to ``prompt_lookup_min``)
are looked up among its earlier tokens; what followed their latest earlier occurrence is the
draft, which the next step verifies alongside the sequence's real token (see
``Scheduler.schedule``). It pays where outputs repeat their context: copying, quoting, editing
code, extracting fields. A draft costs only its tokens' share of a step, and a rejected one
leaves the output exactly what it would have been (the verifier samples from the model's own
distribution), so a sequence whose drafts miss loses little.

Each sequence keeps an index from every n-gram of its tokens to where the tokens after its
latest occurrence start, extended as tokens arrive, so a lookup costs O(n) whatever the length.
Its draft length adapts to what was accepted: it grows by one after a draft accepted in full and
drops to one more than the accepted part after a rejection. A draft rejected outright also
pauses drafting for that sequence, for 1, 3, 7, then 15 steps as rejections repeat (reset by any
acceptance): verifying costs a few rows of the step even when nothing is kept, and text that
does not repeat its context would otherwise pay it on every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.config import SchedulerConfig
from tessera.engine.sequence import Sequence
from tessera.outputs import SpecDecodeStats

MAX_PAUSE_STEPS = 15


@dataclass
class NgramIndex:
    """Per sequence: n -> {n-gram: start of the tokens after its latest occurrence}."""

    by_len: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)
    num_indexed: int = 0
    """Occurrences ending before token ``num_indexed - 1`` are in the index."""
    draft_len: int = 0
    """How many tokens the next draft may have (0: not yet set)."""
    num_paused_steps: int = 0
    """Steps left without drafting."""
    pause_len: int = 0
    """Steps of the latest pause (doubled plus one on each outright rejection)."""


@dataclass
class DraftStats:
    """Counters over every verified draft (the engine's metrics)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    """Entry i: drafted tokens at position i (0-based) that were accepted."""
    drafted_per_position: list[int] = field(default_factory=list)

    def snapshot(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               tuple(self.drafted_per_position),
                               tuple(self.accepted_per_position))


class NgramDrafter:
    """Drafts by prompt lookup for the sequences the verifier can take (see :meth:`eligible`)."""

    def __init__(self, config: SchedulerConfig, max_model_len: int) -> None:
        self.max_draft_tokens = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self.max_model_len = max_model_len
        self.stats = DraftStats(accepted_per_position=[0] * self.max_draft_tokens,
                                drafted_per_position=[0] * self.max_draft_tokens)

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        """Whether ``seq``'s tokens may be verified several at a time: the sampler treats every
        verified row alike, so requests whose sampling depends on the tokens before a row
        (penalties, a grammar) or that return logprobs draft nothing."""
        p = seq.params
        return not p.has_penalties and p.structured is None and p.logprobs is None

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Draft tokens to follow ``seq`` (which is decoding: every token but the last is
        computed), at most ``max_tokens``; empty when nothing matches."""
        if max_tokens < 1 or not self.eligible(seq):
            return []
        index: NgramIndex | None = seq.ngram_index
        if index is None:
            index = seq.ngram_index = NgramIndex(draft_len=self.max_draft_tokens)
        tokens = seq.token_ids
        self._extend(index, tokens)
        if index.num_paused_steps > 0:
            index.num_paused_steps -= 1
            return []
        # The step computes positions num_tokens - 1 .. num_tokens - 1 + k, all below the
        # context length; and drafting past max_tokens would only be thrown away.
        limit = min(max_tokens, index.draft_len, self.max_model_len - len(tokens))
        if seq.params.max_tokens is not None:
            limit = min(limit, seq.params.max_tokens - seq.num_output_tokens - 1)
        if limit < 1:
            return []
        num_tokens = len(tokens)
        for n in range(min(self.max_n, num_tokens - 1), self.min_n - 1, -1):
            start = index.by_len.get(n, {}).get(tuple(tokens[num_tokens - n:]))
            if start is not None:
                return tokens[start : start + limit]
        return []

    def _extend(self, index: NgramIndex, tokens: list[int]) -> None:
        """Index every n-gram that has a token after it and ends before the last token (the
        suffix itself must find an earlier occurrence, not itself)."""
        for end in range(max(index.num_indexed, 1), len(tokens)):
            # The n-grams ending at token end - 1, followed by token ``end``.
            for n in range(self.min_n, min(self.max_n, end) + 1):
                index.by_len.setdefault(n, {})[tuple(tokens[end - n : end])] = end
        index.num_indexed = max(index.num_indexed, len(tokens))

    def observe(self, seq: Sequence, num_drafted: int, num_accepted: int) -> None:
        """Count a verified draft and adapt ``seq``'s next draft length."""
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafted
        stats.num_accepted_tokens += num_accepted
        for i in range(num_drafted):
            stats.drafted_per_position[i] += 1
            stats.accepted_per_position[i] += i < num_accepted
        index: NgramIndex | None = seq.ngram_index
        if index is not None:
            index.draft_len = (min(self.max_draft_tokens, index.draft_len + 1)
                               if num_accepted == num_drafted else num_accepted + 1)
            if num_accepted:
                index.pause_len = 0
            else:
                index.pause_len = min(2 * index.pause_len + 1, MAX_PAUSE_STEPS)
                index.num_paused_steps = index.pause_len
