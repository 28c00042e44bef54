"""Prometheus metrics, named like vLLM's with a ``tessera:`` prefix.

Gauges and token counters mirror the engine core's stats (sent with every step); latency
histograms are measured in the API process, from a request's arrival to its tokens' arrival.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tessera.outputs import EngineStats
from tessera.serve.kv_tier_metrics import KVTierCollector

_LATENCY_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip


class ServerMetrics:
    """All of the server's collectors (labelled with the served model's name), in a registry
    of their own."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"tessera:{name}", doc, labels, registry=reg).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"tessera:{name}", doc, labels, registry=reg).labels(model_name)

        def histogram(name: str, doc: str) -> Histogram:
            metric = Histogram(
                f"tessera:{name}", doc, labels, buckets=_LATENCY_BUCKETS_S, registry=reg
            )
            return metric.labels(model_name)

        self.running = gauge("num_requests_running", "Sequences running in the engine.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting in the engine.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens admitted.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the cache.")
        self.preemptions = counter("num_preemptions", "Sequences preempted.")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.")
        self.tpot = histogram("time_per_output_token_seconds", "Mean time per output token.")
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, end to end.")
        self.kv_tiers = KVTierCollector(model_name)
        reg.register(self.kv_tiers)
        self._last = EngineStats()

    def update_engine(self, stats: EngineStats) -> None:
        """Record the core's latest stats; counters advance by the change since the last."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.kv_tiers.update(stats.kv_tiers)
        last = self._last
        pairs = (
            (self.prompt_tokens, stats.num_prompt_tokens_total - last.num_prompt_tokens_total),
            (
                self.generation_tokens,
                stats.num_generation_tokens_total - last.num_generation_tokens_total,
            ),
            (
                self.prefix_queries,
                stats.num_prefix_queried_tokens_total - last.num_prefix_queried_tokens_total,
            ),
            (
                self.prefix_hits,
                stats.num_prefix_hit_tokens_total - last.num_prefix_hit_tokens_total,
            ),
            (self.preemptions, stats.num_preemptions_total - last.num_preemptions_total),
        )
        for metric, inc in pairs:
            if inc > 0:
                metric.inc(inc)
        self._last = stats

    def observe_request(self, arrival_s: float, first_token_s: float, num_tokens: int) -> None:
        """Record a finished request (times from ``time.monotonic``)."""
        now_s = time.monotonic()
        self.ttft.observe(first_token_s - arrival_s)
        self.e2e.observe(now_s - arrival_s)
        if num_tokens > 1:
            self.tpot.observe((now_s - first_token_s) / (num_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
