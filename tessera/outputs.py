"""What the engine returns: one RequestOutput per prompt (shaped like vLLM's), per step the new
token of every completion that advanced (for streaming), and its stats."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec


@dataclass
class CompletionOutput:
    """One completion of a prompt.

    ``logprobs`` is None unless requested; otherwise one dict per generated token mapping token
    id to log-probability, holding the sampled token and the top-N alternatives.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    error: str | None = None
    """Why the completion ended early when ``finish_reason`` is ``"error"`` (an engine step
    that raised, or a failed worker in disaggregated serving); its tokens so far are kept but
    are not a complete answer."""


@dataclass
class RequestOutput:
    """All completions of one prompt, in the order of ``CompletionOutput.index``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """With ``SamplingParams.prompt_logprobs``: per prompt token, its log-probability and the
    top-N alternatives at its position; None for the first token, which nothing predicts."""
    prompt_token_ranks: list[int | None] | None = None
    """Per prompt token (with ``prompt_logprobs``): its rank at its position, 1 = most likely."""


@dataclass
class TokenDelta:
    """The one token a completion gained in one engine step.

    ``logprobs`` is that step's entry of ``CompletionOutput.logprobs`` (None unless requested);
    ``finish_reason`` is set when this token ended the completion. A completion's first token
    carries the prompt's logprobs, if requested (its prompt is complete exactly then).
    """

    request_id: str
    index: int
    token_id: int
    logprobs: dict[int, float] | None
    finish_reason: str | None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_token_ranks: list[int | None] | None = None


@dataclass
class StepOutput:
    """Everything one engine step produced: the requests that finished and the new tokens."""

    finished: list[RequestOutput] = field(default_factory=list)
    deltas: list[TokenDelta] = field(default_factory=list)


KV_TIER_LATENCY_BUCKETS_S = (
    1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0,
)  # fmt: skip
"""Upper bounds of the per-block load and save latency buckets of a KV tier."""


class KVTierStats(msgspec.Struct, frozen=True):
    """One KV tier outside the device pool (``host``, ``disk`` or ``remote``): its contents,
    cumulative counters and per-block latency histograms (counts per
    ``KV_TIER_LATENCY_BUCKETS_S`` bucket, the last above the last bound). Tiers shared with
    other engines (a host store, the remote store) report 0 blocks and bytes: their contents
    are the store's."""

    tier: str
    num_blocks: int = 0
    num_used_bytes: int = 0
    num_capacity_bytes: int = 0
    writable: bool = True
    """False while the tier takes no writes (disk full or unwritable, store unreachable)."""
    num_queried_tokens_total: int = 0
    """Prompt tokens after the device hits looked up in this tier."""
    num_hit_tokens_total: int = 0
    """Tokens whose KV was loaded from this tier."""
    num_read_bytes_total: int = 0
    num_written_bytes_total: int = 0
    num_evicted_blocks_total: int = 0
    num_failed_loads_total: int = 0
    """Blocks found but refused on load (corrupt, truncated, foreign), then recomputed."""
    num_dropped_saves_total: int = 0
    """Blocks not stored because the tier was behind or had stopped taking writes."""
    load_seconds_counts: tuple[int, ...] = ()
    load_seconds_sum: float = 0.0
    save_seconds_counts: tuple[int, ...] = ()
    save_seconds_sum: float = 0.0


class InstanceStats(msgspec.Struct, frozen=True):
    """One instance of a cluster (``tessera.cluster``) as its router sees it."""

    index: int
    role: str = "both"
    """``both`` (prefill and decode); prefill/decode pools name their roles."""
    up: bool = True
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_routed_total: int = 0
    """Requests the router placed on the instance."""
    num_routed_hit_tokens_total: int = 0
    """Prompt tokens placed on the instance that it held (as far as the router knew)."""
    num_restarts_total: int = 0


class SpecDecodeStats(msgspec.Struct, frozen=True):
    """Speculative decoding's counters: drafts verified, their tokens, the accepted ones, and
    per draft position (0 = the first token after the sequence's last) the tokens drafted and
    accepted there."""

    num_drafts_total: int = 0
    num_draft_tokens_total: int = 0
    num_accepted_tokens_total: int = 0
    drafted_per_position: tuple[int, ...] = ()
    accepted_per_position: tuple[int, ...] = ()

    def merge(self, other: SpecDecodeStats | None) -> SpecDecodeStats:
        """The sum of these counters and ``other``'s (several engines of one model)."""
        if other is None:
            return self

        def add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
            n = max(len(a), len(b))
            return tuple((a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0)
                         for i in range(n))

        return SpecDecodeStats(
            self.num_drafts_total + other.num_drafts_total,
            self.num_draft_tokens_total + other.num_draft_tokens_total,
            self.num_accepted_tokens_total + other.num_accepted_tokens_total,
            add(self.drafted_per_position, other.drafted_per_position),
            add(self.accepted_per_position, other.accepted_per_position))


def merge_spec_decode(stats: Iterable[SpecDecodeStats | None]) -> SpecDecodeStats | None:
    """The speculative decoding counters of several engines summed (None if none drafts)."""
    total: SpecDecodeStats | None = None
    for s in stats:
        if s is not None:
            total = s.merge(total)
    return total


class EngineStats(msgspec.Struct, frozen=True):
    """An engine's gauges and cumulative counters, under the names ``/metrics`` uses; the
    same struct crosses every process boundary (engine core, attention workers)."""

    num_running: int = 0
    """Sequences running (decoding or mid-prefill)."""
    num_waiting: int = 0
    """Sequences queued for admission (new or preempted)."""
    num_free_blocks: int = 0
    kv_cache_usage: float = 0.0
    """Fraction of KV blocks in use (0-1)."""
    num_preemptions_total: int = 0
    num_prompt_tokens_total: int = 0
    num_generation_tokens_total: int = 0
    num_prefix_queried_tokens_total: int = 0
    num_prefix_hit_tokens_total: int = 0
    kv_tiers: tuple[KVTierStats, ...] = ()
    """The KV tiers outside the device pool, nearest first (empty without offloading)."""
    instances: tuple[InstanceStats, ...] = ()
    """A cluster's instances (empty for a single engine)."""
    spec_decode: SpecDecodeStats | None = None
    """Speculative decoding's counters (None when the engine does not draft)."""
