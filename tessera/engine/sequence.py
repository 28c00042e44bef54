"""A sequence: one completion being generated. Pure Python (no torch)."""

from __future__ import annotations

from enum import Enum, auto
from itertools import count
from typing import Any

from tessera.sampling_params import SamplingParams

_seq_counter = count()


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token state of one completion.

    Invariants: ``token_ids`` is prompt followed by output; tokens ``[0, num_computed_tokens)``
    have their KV in the blocks ``block_ids``; ``block_hashes[i]`` is the prefix-cache key of
    full block i and is filled lazily.
    """

    __slots__ = (
        "seq_id",
        "request_id",
        "index",
        "params",
        "token_ids",
        "num_prompt_tokens",
        "num_computed_tokens",
        "num_cached_tokens",
        "num_saved_blocks",
        "num_preemptions",
        "block_ids",
        "block_hashes",
        "status",
        "finish_reason",
        "arrival_s",
        "logprobs",
        "cumulative_logprob",
        "prompt_logprobs",
        "prompt_token_ranks",
        "draft_token_ids",
        "ngram_index",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        arrival_s: float = 0.0,
    ) -> None:
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        # Leading full blocks already handed to the KV connector (stored outside the pool).
        self.num_saved_blocks = 0
        self.num_preemptions = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.arrival_s = arrival_s
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        # Entry i is prompt token i's (None for token 0, which nothing predicts); filled as
        # the prompt's chunks run, so its length says how far the prompt's logprobs go.
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.prompt_token_ranks: list[int | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_token_ranks = [None], [None]
        # Speculative tokens after ``token_ids`` that the current step verifies (set by the
        # scheduler; never part of ``token_ids`` until accepted).
        self.draft_token_ids: list[int] = []
        # The drafter's own state for this sequence (an ``ngram_drafter.NgramIndex``).
        self.ngram_index: Any = None

    def step_token(self, pos: int) -> int:
        """The token at position ``pos`` of this step's input: a real token, or a draft
        token past the real ones."""
        if pos < len(self.token_ids):
            return self.token_ids[pos]
        return self.draft_token_ids[pos - len(self.token_ids)]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt tokens still lack their logprobs: such a sequence computes its
        prompt in full (cached or loaded KV would skip the logits of those positions)."""
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)}, {self.status.name})"
        )


def check_prompt_ids(ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """Raise ValueError for an empty prompt, an unknown token or a prompt that leaves no room."""
    if not ids:
        raise ValueError("prompt is empty")
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise ValueError(
            f"prompt has {len(ids)} tokens; the maximum context length is {max_model_len} "
            "(prompt plus at least one generated token)"
        )


def check_logit_bias(bias: dict[int, float] | None, vocab_size: int) -> None:
    """Raise ValueError for a ``logit_bias`` token id outside the vocabulary (its values are
    checked by ``SamplingParams``)."""
    if bias and max(bias) >= vocab_size:
        raise ValueError(
            f"logit_bias token id {max(bias)} is out of the vocabulary (size {vocab_size})")
