"""KV tiers below the device pool: how fast a device loads from each, and how much they hold.

A prompt's prefix that has left the device pool can come back from host memory, a node-local
SSD or a remote store across the fabric instead of being recomputed (the engine's tiers:
``docs/kv_tiers.md``). The simulator charges such a hit its load: the hit tokens' KV bytes over
the tier's bandwidth, on the step loop. Sizing turns the workload's hit fractions into the KV
bytes each node's DRAM and SSD must keep for the hits to happen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

TIER_NAMES = ("host", "ssd", "remote")
"""Tiers in the order a load looks for a block (nearest first)."""


@dataclass(frozen=True)
class TierLink:
    """The path from one tier to the devices of a node."""

    device_bytes_per_s: float
    """One device's own path to the tier (its PCIe link, C2C link, fabric port or NIC)."""
    node_bytes_per_s: float
    """What the tier's source delivers to a whole node (DRAM channels, the drives, the NICs),
    shared by the node's devices."""


@dataclass(frozen=True)
class KVTiers:
    """Load paths of the host, SSD and remote tiers of one system."""

    devices_per_node: int
    host: TierLink
    ssd: TierLink
    remote: TierLink

    def load_bytes_per_s(self, tier: str) -> float:
        """Rate at which one device loads from ``tier`` while every device of its node loads
        too (the pool steps in lock step, so its devices load at the same time)."""
        link: TierLink = getattr(self, tier)
        return min(link.device_bytes_per_s, link.node_bytes_per_s / self.devices_per_node)


def _link(raw: dict[str, Any]) -> TierLink:
    return TierLink(device_bytes_per_s=float(raw["device_gb_s"]) * 1e9,
                    node_bytes_per_s=float(raw["node_gb_s"]) * 1e9)


def kv_tiers_from_catalog(raw: dict[str, Any]) -> KVTiers:
    """A :class:`KVTiers` from a catalog ``kv_tiers`` entry (``data/hardware.json``)."""
    return KVTiers(devices_per_node=int(raw["devices_per_node"]), host=_link(raw["host"]),
                   ssd=_link(raw["ssd"]), remote=_link(raw["remote"]))


@dataclass(frozen=True)
class TierSizing:
    """KV bytes the tiers must hold for a workload's tier hits (see docs/sim.md).

    A session keeps its prompt's prefix in the tiers between its requests; the share of a
    prompt each tier serves is that tier's hit fraction. The SSD tier is written through from
    the host tier, so it also keeps the host tier's blocks; a workload with no SSD hits has no
    SSD tier and needs none.
    """

    num_sessions: float
    num_nodes: int
    """Nodes whose devices load the hits (the prefill pool, or every node when colocated)."""
    host_bytes_per_node: float
    ssd_bytes_per_node: float
    remote_bytes: float
    """The remote store's whole working set (one store serves every node)."""


def tier_sizing(num_sessions: float, prompt_tokens: float, kv_bytes_per_token: float,
                fractions: dict[str, float], num_loading_devices: int,
                devices_per_node: int) -> TierSizing:
    """Working set of the tiers: ``num_sessions`` prompts of ``prompt_tokens`` at
    ``kv_bytes_per_token`` (one copy of every layer), split by the per-tier hit ``fractions``,
    spread evenly over the nodes of ``num_loading_devices``."""
    nodes = max(1, math.ceil(num_loading_devices / devices_per_node))
    per_session = prompt_tokens * kv_bytes_per_token
    host, ssd = fractions["host"], fractions["ssd"]
    ssd_share = host + ssd if ssd > 0 else 0.0
    return TierSizing(
        num_sessions=num_sessions, num_nodes=nodes,
        host_bytes_per_node=num_sessions * per_session * host / nodes,
        ssd_bytes_per_node=num_sessions * per_session * ssd_share / nodes,
        remote_bytes=num_sessions * per_session * fractions["remote"])


def tier_load_s(tier_tokens: np.ndarray, kv_bytes_per_token: float, tiers: KVTiers) -> float:
    """Seconds one device spends loading ``tier_tokens`` (one count per ``TIER_NAMES`` entry,
    or rows of them, summed) at ``kv_bytes_per_token`` on that device. The tiers are read one
    after the other: the engine loads on its step loop, before the step that reads the KV."""
    counts = np.asarray(tier_tokens, dtype=np.float64).reshape(-1, len(TIER_NAMES)).sum(axis=0)
    rates = np.array([tiers.load_bytes_per_s(t) for t in TIER_NAMES])
    return float(np.sum(counts / rates)) * kv_bytes_per_token
