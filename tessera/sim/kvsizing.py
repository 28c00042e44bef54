"""How much host DRAM and SSD per node a workload's tier hits want (``tessera sim``/``plan``)."""

from __future__ import annotations

from .costmodel import KV_BYTES_PER_ELEMENT
from .deployment import Deployment
from .hardware import System
from .model import ModelCosts
from .tiers import TierSizing, tier_sizing
from .workload import Workload


def model_kv_bytes_per_token(model: ModelCosts) -> float:
    """KV bytes of one token over every layer, one copy (what a tier stores per token)."""
    return model.kv_elements_per_token * KV_BYTES_PER_ELEMENT * (
        model.num_layers + model.num_mtp_layers)


def size_tiers(system: System, model: ModelCosts, dep: Deployment, workload: Workload,
               in_flight: float) -> TierSizing | None:
    """The tiers' working set for ``workload`` on ``dep``; None when it has no tier hits.

    Sessions are ``workload.num_sessions``, or ``in_flight`` (the requests in flight: each had
    its prefix in the tiers when it was loaded, so they are the least the tiers hold). The
    hits are loaded by the prefill pool's nodes (pd, afd) or every node (colocated)."""
    fractions = workload.tier_fractions()
    if not any(fractions.values()):
        return None
    sessions = float(workload.num_sessions) if workload.num_sessions is not None else in_flight
    loading = dep.num_devices if dep.mode == "colocated" else dep.num_prefill_devices
    return tier_sizing(sessions, float(workload.input_tokens), model_kv_bytes_per_token(model),
                       fractions, loading, system.tiers().devices_per_node)
