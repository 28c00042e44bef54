"""Request streams: Poisson arrivals or closed-loop concurrency, length distributions, prefix reuse."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from .errors import SimError
from .inputs import MAX_REQUESTS, check_float, check_int
from .tiers import TIER_NAMES

TIER_FLAGS = {"host": "--host-hit", "ssd": "--ssd-hit", "remote": "--remote-hit"}


@dataclass(frozen=True)
class Workload:
    """What users send.

    Lengths are means; ``length_cv`` > 0 draws them from a lognormal with that coefficient of
    variation. Exactly one of ``request_rate_per_s`` (open loop, Poisson) and ``concurrency``
    (closed loop: a new request as soon as one finishes) is set. ``prefix_hit_fraction`` of each
    prompt is already in the prefix cache and is not recomputed. ``host_hit_fraction``,
    ``ssd_hit_fraction`` and ``remote_hit_fraction`` of it are not recomputed either but loaded
    from that KV tier first (``tessera/sim/tiers.py``); all hit fractions together stay below 1.
    ``num_sessions``, when set, is how many sessions keep their prefixes in the tiers (their
    working set; by default the requests in flight). ``kv_tokens``, when set, is the mean KV
    length a decoding sequence sees (decode-only studies); by default it follows from the
    prompt and output lengths.
    """

    num_requests: int
    input_tokens: int
    output_tokens: int
    request_rate_per_s: float | None = None
    concurrency: int | None = None
    length_cv: float = 0.0
    prefix_hit_fraction: float = 0.0
    kv_tokens: int | None = None
    host_hit_fraction: float = 0.0
    ssd_hit_fraction: float = 0.0
    remote_hit_fraction: float = 0.0
    num_sessions: int | None = None

    def tier_fractions(self) -> dict[str, float]:
        """Share of each prompt loaded from each tier, by tier name (``TIER_NAMES``)."""
        return {"host": self.host_hit_fraction, "ssd": self.ssd_hit_fraction,
                "remote": self.remote_hit_fraction}

    def validate(self) -> None:
        """Raise :class:`SimError` on impossible numbers."""
        check_int("number of requests", self.num_requests, 1, MAX_REQUESTS)
        check_int("--input-tokens", self.input_tokens)
        check_int("--output-tokens", self.output_tokens)
        if (self.request_rate_per_s is None) == (self.concurrency is None):
            raise SimError("give exactly one of --request-rate and --concurrency")
        if self.request_rate_per_s is not None:
            check_float("--request-rate", self.request_rate_per_s, 0.0, min_open=True)
        if self.concurrency is not None:
            check_int("--concurrency", self.concurrency)
        check_float("--prefix-hit", self.prefix_hit_fraction, 0.0, 1.0, max_open=True)
        fractions = self.tier_fractions()
        for tier in TIER_NAMES:
            check_float(TIER_FLAGS[tier], fractions[tier], 0.0, 1.0, max_open=True)
        total = self.prefix_hit_fraction + sum(fractions.values())
        if total >= 1.0:
            raise SimError(f"--prefix-hit + {' + '.join(TIER_FLAGS.values())} must be below 1"
                           f" (got {total:g}): some of each prompt is always computed")
        if self.num_sessions is not None:
            check_int("--sessions", self.num_sessions)
        check_float("--length-cv", self.length_cv, 0.0)
        if self.kv_tokens is not None:
            check_int("--kv-tokens", self.kv_tokens)


@dataclass(frozen=True)
class Requests:
    """Per-request arrays (index = request id)."""

    input_tokens: np.ndarray
    output_tokens: np.ndarray
    cached_tokens: np.ndarray
    """Prompt tokens not computed: device prefix hits plus tier hits."""
    decode_start_context: np.ndarray
    arrival_s: np.ndarray | None
    """Open-loop arrival times; ``None`` in closed loop (arrivals follow completions)."""
    tier_tokens: np.ndarray | None = None
    """Of ``cached_tokens``, those loaded from each tier: one column per ``TIER_NAMES`` entry;
    ``None`` when no tier hits."""


def _lengths(rng: np.random.Generator, mean: int, cv: float, n: int) -> np.ndarray:
    if cv <= 0:
        return np.full(n, mean, dtype=np.int64)
    sigma2 = np.log1p(cv * cv)
    draws = rng.lognormal(np.log(mean) - sigma2 / 2.0, np.sqrt(sigma2), n)
    return np.maximum(np.rint(draws), 1).astype(np.int64)


def hit_tokens(workload: Workload, prompt_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Tokens of each prompt not computed (device and tier hits), and of those the ones each
    tier serves (one column per ``TIER_NAMES`` entry; None without tier hits)."""
    cached = np.floor(prompt_tokens * workload.prefix_hit_fraction).astype(np.int64)
    fractions = workload.tier_fractions()
    if not any(fractions.values()):
        return cached, None
    # Cumulative shares floored once each, so that the tiers' tokens and the device's add up to
    # the floor of the whole hit share and the device's share is what it was alone.
    edges = [cached]
    share = workload.prefix_hit_fraction
    for tier in TIER_NAMES:
        share += fractions[tier]
        edges.append(np.floor(prompt_tokens * share).astype(np.int64))
    return edges[-1], np.stack([b - a for a, b in pairwise(edges)], axis=1)


def generate(workload: Workload, seed: int = 0) -> Requests:
    """Draw the request stream of ``workload`` (deterministic for a seed)."""
    workload.validate()
    rng = np.random.default_rng(seed)
    n = workload.num_requests
    inp = _lengths(rng, workload.input_tokens, workload.length_cv, n)
    out = _lengths(rng, workload.output_tokens, workload.length_cv, n)
    cached, tiers = hit_tokens(workload, inp)
    if workload.kv_tokens is not None:
        start = np.maximum(workload.kv_tokens - out // 2, 1)
    else:
        start = inp.copy()
    arrival = None
    if workload.request_rate_per_s is not None:
        arrival = np.cumsum(rng.exponential(1.0 / workload.request_rate_per_s, n))
    return Requests(input_tokens=inp, output_tokens=out, cached_tokens=cached,
                    decode_start_context=start.astype(np.int64), arrival_s=arrival,
                    tier_tokens=tiers)
