"""Counters of one KV tier, kept where the tier runs and reported as ``KVTierStats``.
Pure Python (no torch)."""

from __future__ import annotations

import bisect
import threading

from tessera.outputs import KV_TIER_LATENCY_BUCKETS_S, KVTierStats


class LatencyHistogram:
    """Counts of observed durations per bucket of ``KV_TIER_LATENCY_BUCKETS_S`` (the last
    count is above the last bound), and their sum."""

    def __init__(self) -> None:
        self.counts = [0] * (len(KV_TIER_LATENCY_BUCKETS_S) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(KV_TIER_LATENCY_BUCKETS_S, seconds)] += 1
        self.sum_s += seconds


class TierCounters:
    """Cumulative counters of one tier. Updated from the engine's thread and a tier's writer
    thread, so every change holds ``lock``."""

    def __init__(self, tier: str, capacity_bytes: int) -> None:
        self.tier = tier
        self.capacity_bytes = capacity_bytes
        self.lock = threading.Lock()
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.num_read_bytes = 0
        self.num_written_bytes = 0
        self.num_evicted_blocks = 0
        self.num_failed_loads = 0
        self.num_dropped_saves = 0
        self.load_s = LatencyHistogram()
        self.save_s = LatencyHistogram()

    def snapshot(self, num_blocks: int, used_bytes: int, writable: bool = True) -> KVTierStats:
        with self.lock:
            return KVTierStats(
                tier=self.tier,
                num_blocks=num_blocks,
                num_used_bytes=used_bytes,
                num_capacity_bytes=self.capacity_bytes,
                writable=writable,
                num_queried_tokens_total=self.num_queried_tokens,
                num_hit_tokens_total=self.num_hit_tokens,
                num_read_bytes_total=self.num_read_bytes,
                num_written_bytes_total=self.num_written_bytes,
                num_evicted_blocks_total=self.num_evicted_blocks,
                num_failed_loads_total=self.num_failed_loads,
                num_dropped_saves_total=self.num_dropped_saves,
                load_seconds_counts=tuple(self.load_s.counts),
                load_seconds_sum=self.load_s.sum_s,
                save_seconds_counts=tuple(self.save_s.counts),
                save_seconds_sum=self.save_s.sum_s,
            )


def sum_tier_stats(groups: list[tuple[KVTierStats, ...]]) -> tuple[KVTierStats, ...]:
    """Several engines' tiers as one per tier name (counters, bytes and histograms added;
    a tier is writable while any engine's is), in the order first seen."""
    merged: dict[str, KVTierStats] = {}
    for group in groups:
        for t in group:
            m = merged.get(t.tier)
            if m is None:
                merged[t.tier] = t
                continue
            merged[t.tier] = KVTierStats(
                tier=t.tier,
                num_blocks=m.num_blocks + t.num_blocks,
                num_used_bytes=m.num_used_bytes + t.num_used_bytes,
                num_capacity_bytes=m.num_capacity_bytes + t.num_capacity_bytes,
                writable=m.writable or t.writable,
                num_queried_tokens_total=m.num_queried_tokens_total + t.num_queried_tokens_total,
                num_hit_tokens_total=m.num_hit_tokens_total + t.num_hit_tokens_total,
                num_read_bytes_total=m.num_read_bytes_total + t.num_read_bytes_total,
                num_written_bytes_total=m.num_written_bytes_total + t.num_written_bytes_total,
                num_evicted_blocks_total=m.num_evicted_blocks_total + t.num_evicted_blocks_total,
                num_failed_loads_total=m.num_failed_loads_total + t.num_failed_loads_total,
                num_dropped_saves_total=m.num_dropped_saves_total + t.num_dropped_saves_total,
                load_seconds_counts=_add(m.load_seconds_counts, t.load_seconds_counts),
                load_seconds_sum=m.load_seconds_sum + t.load_seconds_sum,
                save_seconds_counts=_add(m.save_seconds_counts, t.save_seconds_counts),
                save_seconds_sum=m.save_seconds_sum + t.save_seconds_sum,
            )
    return tuple(merged.values())


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True)) if a and b else a or b
