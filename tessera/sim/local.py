"""``tessera sim --hardware cpu-local``: one Tessera engine on this machine, simulated.

A colocated single-group scenario on the calibrated local machine runs through
:mod:`tessera.sim.engine_sim` (the engine's real scheduler and block manager) rather than the
fleet simulator's vectorised slots, and reports the same :class:`SimResult` fields.
"""

from __future__ import annotations

import numpy as np

from tessera.config import CacheConfig

from .costmodel import KV_BYTES_PER_ELEMENT, PoolCost
from .engine_sim import EngineScenario, simulate_engine
from .hardware import BYTES_PER_ELEMENT, System
from .model import ModelCosts
from .result import SimResult, mean_p50_p99
from .workload import generate

BLOCK_SIZE = CacheConfig().block_size


def simulate_local(scenario: object, system: System, model: ModelCosts) -> SimResult:
    """Simulate a colocated, one-group ``scenario`` (a :class:`Scenario`) as one engine.

    The engine's ``max_num_seqs`` is ``--batch-per-dp``; ``--concurrency`` is a closed loop of
    clients, ``--request-rate`` Poisson arrivals. The KV cache uses
    the weights' precision and takes the memory the cost model leaves after the weights.
    """
    dep, wl = scenario.deployment, scenario.workload  # type: ignore[attr-defined]
    reqs = generate(wl, scenario.seed)  # type: ignore[attr-defined]
    kv_bytes = BYTES_PER_ELEMENT[dep.precision]
    pool = PoolCost(system, model, dep.decode_layout(model))
    # The pool sizes capacity for its own KV element size; rescale to the weights' precision.
    kv_tokens = pool.kv_capacity_tokens() * KV_BYTES_PER_ELEMENT / kv_bytes
    res = simulate_engine(EngineScenario(
        system=system, model=model, precision=dep.precision, kv_bytes_per_element=kv_bytes,
        prompt_tokens=tuple(int(x) for x in reqs.input_tokens),
        output_tokens=tuple(int(x) for x in reqs.output_tokens),
        num_blocks=max(int(kv_tokens) // BLOCK_SIZE, 1), block_size=BLOCK_SIZE,
        max_num_seqs=dep.batch_per_dp, concurrency=wl.concurrency,
        arrival_s=None if reqs.arrival_s is None else tuple(float(x) for x in reqs.arrival_s)))
    tpot = mean_p50_p99(np.array(res.tpot_ms))
    ttft = mean_p50_p99(np.array(res.ttft_ms))
    duration = max(res.duration_s, 1e-12)
    chips = 1.0
    return SimResult(
        hardware=system.name, model=model.name, mode="colocated (engine scheduler)", chips=chips,
        devices=1, decode_chips=chips, prefill_chips=chips, num_requests=wl.num_requests,
        num_finished=wl.num_requests, num_unfinished=0,
        decode_tokens_per_s_per_chip=res.output_tokens_per_s,
        prefill_tokens_per_s_per_chip=float(np.sum(reqs.input_tokens)) / duration,
        tokens_per_s_per_chip=res.output_tokens_per_s,
        tpot_ms_mean=tpot[0], tpot_ms_p50=tpot[1], tpot_ms_p99=tpot[2],
        ttft_ms_mean=ttft[0], ttft_ms_p50=ttft[1], ttft_ms_p99=ttft[2],
        decode_step_ms_mean=duration * 1e3 / max(res.num_steps, 1),
        mean_decode_batch_per_dp=res.num_output_tokens / max(res.num_steps, 1),
        kv_capacity_tokens_per_dp=int(kv_tokens), makespan_s=res.duration_s,
        num_events=res.num_steps)
