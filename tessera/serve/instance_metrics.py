"""Prometheus metrics of a cluster's instances (``--data-parallel``), one series per instance
and role: its state and load, and the router's decisions about it.

Like the KV tiers' (``kv_tier_metrics.py``), the figures arrive whole with each step's stats
(``InstanceStats``), so this collector renders the latest.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tessera.outputs import InstanceStats

_GAUGES = (
    ("instance_up", "up", "1 while the instance serves (0: failed, restarting)."),
    ("instance_num_requests_running", "num_running", "Sequences running on the instance."),
    ("instance_num_requests_waiting", "num_waiting", "Sequences waiting on the instance."),
    ("instance_kv_cache_usage_perc", "kv_cache_usage",
     "Fraction of the instance's KV cache blocks in use (0-1)."),
)
_COUNTERS = (
    ("router_routed_requests", "num_routed_total", "Requests the router placed on the instance."),
    ("router_routed_hit_tokens", "num_routed_hit_tokens_total",
     "Prompt tokens placed on an instance that held their KV."),
    ("instance_restarts", "num_restarts_total", "Times the instance was started again."),
)


class InstanceCollector(Collector):
    """Renders the latest ``InstanceStats`` given to ``update``, per served model."""

    def __init__(self) -> None:
        self.instances: dict[str, tuple[InstanceStats, ...]] = {}

    def update(self, model_name: str, instances: tuple[InstanceStats, ...]) -> None:
        self.instances[model_name] = instances

    def collect(self) -> Iterator[Metric]:
        series = [(model, s) for model, group in self.instances.items() for s in group]
        if not series:
            return
        labels = ["model_name", "instance", "role"]
        for name, field, doc in _GAUGES:
            g = GaugeMetricFamily(f"tessera:{name}", doc, labels=labels)
            for model, s in series:
                g.add_metric([model, str(s.index), s.role], float(getattr(s, field)))
            yield g
        for name, field, doc in _COUNTERS:
            c = CounterMetricFamily(f"tessera:{name}", doc, labels=labels)
            for model, s in series:
                c.add_metric([model, str(s.index), s.role], float(getattr(s, field)))
            yield c
