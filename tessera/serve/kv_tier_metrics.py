"""Prometheus metrics of the KV tiers below the device pool, one series per tier.

The tiers live in the engine core; their counters and per-block latency histograms arrive
whole with every step's stats (``KVTierStats``), so this collector renders the latest ones
instead of keeping prometheus-client counters in step with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tessera.outputs import KV_TIER_LATENCY_BUCKETS_S, KVTierStats

_GAUGES = (
    ("kv_tier_blocks", "num_blocks", "KV blocks held by the tier."),
    ("kv_tier_used_bytes", "num_used_bytes", "Bytes held by the tier."),
    ("kv_tier_capacity_bytes", "num_capacity_bytes", "Byte budget of the tier."),
    ("kv_tier_writable", "writable", "1 while the tier takes writes (0: disk full or "
                                     "unwritable, store unreachable)."),
)
_COUNTERS = (
    ("kv_tier_queries_tokens", "num_queried_tokens_total",
     "Prompt tokens after the device prefix hits looked up in the tier."),
    ("kv_tier_hits_tokens", "num_hit_tokens_total", "Tokens whose KV was loaded from the tier."),
    ("kv_tier_read_bytes", "num_read_bytes_total", "Bytes read from the tier."),
    ("kv_tier_written_bytes", "num_written_bytes_total", "Bytes written to the tier."),
    ("kv_tier_evicted_blocks", "num_evicted_blocks_total", "Blocks evicted from the tier."),
    ("kv_tier_failed_loads", "num_failed_loads_total",
     "Blocks refused on load (corrupt, truncated, foreign) and recomputed."),
    ("kv_tier_dropped_saves", "num_dropped_saves_total",
     "Blocks not stored: the tier was behind or not writable."),
)


class KVTierCollector(Collector):
    """Renders the latest ``KVTierStats`` given to ``update``, per served model."""

    def __init__(self) -> None:
        self.tiers: dict[str, tuple[KVTierStats, ...]] = {}
        """Served model name -> its engine's tiers."""

    def update(self, model_name: str, tiers: tuple[KVTierStats, ...]) -> None:
        self.tiers[model_name] = tiers

    def collect(self) -> Iterator[Metric]:
        series = [(model, t) for model, tiers in self.tiers.items() for t in tiers]
        if not series:
            return
        labels = ["model_name", "tier"]
        for name, field, doc in _GAUGES:
            g = GaugeMetricFamily(f"tessera:{name}", doc, labels=labels)
            for model, t in series:
                g.add_metric([model, t.tier], float(getattr(t, field)))
            yield g
        for name, field, doc in _COUNTERS:
            c = CounterMetricFamily(f"tessera:{name}", doc, labels=labels)
            for model, t in series:
                c.add_metric([model, t.tier], float(getattr(t, field)))
            yield c
        for name, counts_field, sum_field, doc in (
            ("kv_tier_load_seconds", "load_seconds_counts", "load_seconds_sum",
             "Seconds to load one block from the tier."),
            ("kv_tier_save_seconds", "save_seconds_counts", "save_seconds_sum",
             "Seconds to store one block in the tier."),
        ):
            h = HistogramMetricFamily(f"tessera:{name}", doc, labels=labels)
            for model, t in series:
                counts = getattr(t, counts_field) or (0,) * (len(KV_TIER_LATENCY_BUCKETS_S) + 1)
                bounds = [str(b) for b in KV_TIER_LATENCY_BUCKETS_S] + ["+Inf"]
                buckets = list(zip(bounds, accumulate(counts), strict=True))
                h.add_metric([model, t.tier], buckets, getattr(t, sum_field))
            yield h
