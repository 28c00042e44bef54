"""Prometheus metrics, named like vLLM's with a ``tessera:`` prefix, one series per served
model (label ``model_name``).

Gauges and token counters mirror each engine core's stats (sent with every step); latency
histograms are measured in the API process, from a request's arrival to its tokens' arrival.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tessera.outputs import EngineStats, SpecDecodeStats
from tessera.serve.instance_metrics import InstanceCollector
from tessera.serve.kv_tier_metrics import KVTierCollector

_LATENCY_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_LABELS = ["model_name"]


class ServerMetrics:
    """All of the server's collectors, in a registry of their own; ``for_model`` gives the
    series of one served model."""

    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry()

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"tessera:{name}", doc, _LABELS, registry=reg)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"tessera:{name}", doc, _LABELS, registry=reg)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(
                f"tessera:{name}", doc, _LABELS, buckets=_LATENCY_BUCKETS_S, registry=reg
            )

        self.running = gauge("num_requests_running", "Sequences running in the engine.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting in the engine.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens admitted.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the cache.")
        self.preemptions = counter("num_preemptions", "Sequences preempted.")
        self.spec_drafts = counter("spec_decode_num_drafts", "Drafts verified.")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.spec_accepted_tokens = counter("spec_decode_num_accepted_tokens",
                                            "Draft tokens accepted.")
        self.spec_accepted_per_pos = Counter(
            "tessera:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in the draft (0: first).",
            [*_LABELS, "position"], registry=reg)
        self.spec_drafted_per_pos = Counter(
            "tessera:spec_decode_num_draft_tokens_per_pos",
            "Draft tokens verified, by position in the draft (0: first).",
            [*_LABELS, "position"], registry=reg)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.")
        self.tpot = histogram("time_per_output_token_seconds", "Mean time per output token.")
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, end to end.")
        self.kv_tiers = KVTierCollector()
        reg.register(self.kv_tiers)
        self.instances = InstanceCollector()
        reg.register(self.instances)

    def for_model(self, model_name: str) -> ModelMetrics:
        """The series of ``model_name`` (created at once, so every served model shows)."""
        return ModelMetrics(self, model_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """One served model's series of the server's collectors."""

    def __init__(self, server: ServerMetrics, model_name: str) -> None:
        self.model_name = model_name
        self._kv_tiers = server.kv_tiers
        self._instances = server.instances
        self.running = server.running.labels(model_name)
        self.waiting = server.waiting.labels(model_name)
        self.kv_usage = server.kv_usage.labels(model_name)
        self.prompt_tokens = server.prompt_tokens.labels(model_name)
        self.generation_tokens = server.generation_tokens.labels(model_name)
        self.prefix_queries = server.prefix_queries.labels(model_name)
        self.prefix_hits = server.prefix_hits.labels(model_name)
        self.preemptions = server.preemptions.labels(model_name)
        self._server = server
        self.ttft = server.ttft.labels(model_name)
        self.tpot = server.tpot.labels(model_name)
        self.e2e = server.e2e.labels(model_name)
        self._last = EngineStats()

    def update_engine(self, stats: EngineStats) -> None:
        """Record the core's latest stats; counters advance by the change since the last."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self._kv_tiers.update(self.model_name, stats.kv_tiers)
        self._instances.update(self.model_name, stats.instances)
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
        if stats.spec_decode is not None:
            self._update_spec_decode(stats.spec_decode, last.spec_decode or SpecDecodeStats())
        self._last = stats

    def _update_spec_decode(self, now: SpecDecodeStats, last: SpecDecodeStats) -> None:
        server, name = self._server, self.model_name
        for metric, inc in (
            (server.spec_drafts, now.num_drafts_total - last.num_drafts_total),
            (server.spec_draft_tokens, now.num_draft_tokens_total - last.num_draft_tokens_total),
            (server.spec_accepted_tokens,
             now.num_accepted_tokens_total - last.num_accepted_tokens_total),
        ):
            if inc > 0:
                metric.labels(name).inc(inc)
        for metric, values, old in (
            (server.spec_drafted_per_pos, now.drafted_per_position, last.drafted_per_position),
            (server.spec_accepted_per_pos, now.accepted_per_position,
             last.accepted_per_position),
        ):
            for pos, value in enumerate(values):
                inc = value - (old[pos] if pos < len(old) else 0)
                if inc > 0:
                    metric.labels(name, str(pos)).inc(inc)

    def observe_request(self, arrival_s: float, first_token_s: float, num_tokens: int) -> None:
        """Record a finished request (times from ``time.monotonic``)."""
        now_s = time.monotonic()
        self.ttft.observe(first_token_s - arrival_s)
        self.e2e.observe(now_s - arrival_s)
        if num_tokens > 1:
            self.tpot.observe((now_s - first_token_s) / (num_tokens - 1))
