"""Request streams: Poisson arrivals or closed-loop concurrency, length distributions, prefix reuse."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SimError
from .inputs import MAX_REQUESTS, check_float, check_int


@dataclass(frozen=True)
class Workload:
    """What users send.

    Lengths are means; ``length_cv`` > 0 draws them from a lognormal with that coefficient of
    variation. Exactly one of ``request_rate_per_s`` (open loop, Poisson) and ``concurrency``
    (closed loop: a new request as soon as one finishes) is set. ``prefix_hit_fraction`` of each
    prompt is already in the prefix cache and is not recomputed. ``kv_tokens``, when set, is the
    mean KV length a decoding sequence sees (decode-only studies); by default it follows from the
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
        check_float("--length-cv", self.length_cv, 0.0)
        if self.kv_tokens is not None:
            check_int("--kv-tokens", self.kv_tokens)


@dataclass(frozen=True)
class Requests:
    """Per-request arrays (index = request id)."""

    input_tokens: np.ndarray
    output_tokens: np.ndarray
    cached_tokens: np.ndarray
    decode_start_context: np.ndarray
    arrival_s: np.ndarray | None
    """Open-loop arrival times; ``None`` in closed loop (arrivals follow completions)."""


def _lengths(rng: np.random.Generator, mean: int, cv: float, n: int) -> np.ndarray:
    if cv <= 0:
        return np.full(n, mean, dtype=np.int64)
    sigma2 = np.log1p(cv * cv)
    draws = rng.lognormal(np.log(mean) - sigma2 / 2.0, np.sqrt(sigma2), n)
    return np.maximum(np.rint(draws), 1).astype(np.int64)


def generate(workload: Workload, seed: int = 0) -> Requests:
    """Draw the request stream of ``workload`` (deterministic for a seed)."""
    workload.validate()
    rng = np.random.default_rng(seed)
    n = workload.num_requests
    inp = _lengths(rng, workload.input_tokens, workload.length_cv, n)
    out = _lengths(rng, workload.output_tokens, workload.length_cv, n)
    cached = np.floor(inp * workload.prefix_hit_fraction).astype(np.int64)
    if workload.kv_tokens is not None:
        start = np.maximum(workload.kv_tokens - out // 2, 1)
    else:
        start = inp.copy()
    arrival = None
    if workload.request_rate_per_s is not None:
        arrival = np.cumsum(rng.exponential(1.0 / workload.request_rate_per_s, n))
    return Requests(input_tokens=inp, output_tokens=out, cached_tokens=cached,
                    decode_start_context=start.astype(np.int64), arrival_s=arrival)
