"""Simulation result and the metrics computed from per-request timestamps."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SimResult:
    """Outcome of one simulation. Rates are per chip of the pool that does the work.

    ``decode_tokens_per_s_per_chip`` counts output tokens over the decode (or colocated) pool's
    chips, ``prefill_tokens_per_s_per_chip`` computed prompt tokens over the prefill pool's
    chips (colocated: all chips), each in its steady window: between the 10th and 90th
    percentile of completions (decode; ending at the last arrival if that is earlier, since the
    pool only drains afterwards) or of first tokens (prefill). Step time and batch means
    are over the decode steps of that window too. ``tokens_per_s_per_chip`` is output tokens over all chips.

    The ``*tier*`` fields size the KV tiers for the workload's tier hits (all 0 without any;
    :class:`tessera.sim.tiers.TierSizing`): the sessions whose prefixes they keep, the nodes
    that load them, the host DRAM and SSD each such node keeps, and the remote store's total.
    """

    hardware: str
    model: str
    mode: str
    chips: float
    devices: int
    decode_chips: float
    prefill_chips: float
    num_requests: int
    num_finished: int
    num_unfinished: int
    decode_tokens_per_s_per_chip: float
    prefill_tokens_per_s_per_chip: float
    tokens_per_s_per_chip: float
    tpot_ms_mean: float
    tpot_ms_p50: float
    tpot_ms_p99: float
    ttft_ms_mean: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    decode_step_ms_mean: float
    mean_decode_batch_per_dp: float
    kv_capacity_tokens_per_dp: int
    makespan_s: float
    num_events: int
    tier_sessions: float = 0.0
    tier_nodes: int = 0
    host_tier_bytes_per_node: float = 0.0
    ssd_tier_bytes_per_node: float = 0.0
    remote_tier_bytes: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        return asdict(self)


def mean_p50_p99(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, median and 99th percentile (NaN-free input; zeros when empty)."""
    if values.size == 0:
        return 0.0, 0.0, 0.0
    return (float(values.mean()), float(np.percentile(values, 50)),
            float(np.percentile(values, 99)))


def windowed_rate(end_times: np.ndarray, amounts: np.ndarray, t_lo: float, t_hi: float) -> float:
    """Amount per second of steps ending within ``(t_lo, t_hi]`` (whole run if that is empty)."""
    if end_times.size == 0:
        return 0.0
    mask = (end_times > t_lo) & (end_times <= t_hi)
    if t_hi > t_lo and mask.sum() >= 2:
        return float(amounts[mask].sum() / (t_hi - t_lo))
    span = float(end_times.max())
    return float(amounts.sum() / span) if span > 0 else 0.0
