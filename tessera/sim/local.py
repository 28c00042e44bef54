"""``tessera sim --hardware cpu-local``: Tessera's engines on this machine, simulated.

Scenarios on the calibrated local machine that its runtime launches (colocated groups of one
device, as one engine or data-parallel instances, and prefill/decode instances of one device)
run through :mod:`tessera.sim.engine_sim` (the engine's real scheduler and block manager)
rather than the fleet simulator's vectorised slots, and report the same :class:`SimResult`
fields.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from tessera.config import CacheConfig

from .costmodel import KV_BYTES_PER_ELEMENT, PoolCost, PoolLayout
from .engine_sim import EngineScenario, simulate_engine
from .errors import SimError
from .hardware import BYTES_PER_ELEMENT, System
from .local_cluster import Requests, simulate_data_parallel, simulate_prefill_decode
from .model import ModelCosts
from .result import SimResult, mean_p50_p99
from .workload import generate

BLOCK_SIZE = CacheConfig().block_size


def local_engine(system: System, model: ModelCosts, precision: str, max_num_seqs: int,
                 max_num_batched_tokens: int) -> EngineScenario:
    """One engine on a device of ``system`` (no requests yet): its KV cache takes the
    memory the cost model leaves after the weights, at the weights' precision."""
    kv_bytes = BYTES_PER_ELEMENT[precision]
    layout = PoolLayout(num_groups=1, tp=1, num_ep=1, ffn_split=False, num_micro_batches=1,
                        precision=precision)
    # The pool sizes capacity for its own KV element size; rescale to the weights' precision.
    kv_tokens = PoolCost(system, model, layout).kv_capacity_tokens() * KV_BYTES_PER_ELEMENT / kv_bytes
    return EngineScenario(
        system=system, model=model, precision=precision, kv_bytes_per_element=kv_bytes,
        prompt_tokens=(), output_tokens=(), num_blocks=max(int(kv_tokens) // BLOCK_SIZE, 1),
        block_size=BLOCK_SIZE, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens)


def simulate_local(scenario: object, system: System, model: ModelCosts) -> SimResult:
    """Simulate ``scenario`` (a :class:`Scenario`) as Tessera's engines on this machine.

    One colocated group is one engine; ``--batch-per-dp`` is its ``max_num_seqs``,
    ``--concurrency`` a closed loop of clients, ``--request-rate`` Poisson arrivals. Several
    groups are data-parallel instances, and ``pd`` prefill instances of one device hand over
    to decode instances (:mod:`tessera.sim.local_cluster`; open-loop arrivals only).
    """
    dep, wl = scenario.deployment, scenario.workload  # type: ignore[attr-defined]
    reqs = generate(wl, scenario.seed)  # type: ignore[attr-defined]
    engine = local_engine(system, model, dep.precision, dep.batch_per_dp,
                          dep.chunk_tokens_per_group if dep.mode == "colocated"
                          else dep.prefill_tokens_per_device)
    prompts = tuple(int(x) for x in reqs.input_tokens)
    outputs = tuple(int(x) for x in reqs.output_tokens)
    if dep.mode == "colocated" and dep.num_dp == 1:
        res = simulate_engine(replace(
            engine, prompt_tokens=prompts, output_tokens=outputs, concurrency=wl.concurrency,
            arrival_s=None if reqs.arrival_s is None else tuple(float(x) for x in reqs.arrival_s)))
        return _result(system, model, "colocated (engine scheduler)", 1, wl.num_requests,
                       np.array(res.ttft_ms), np.array(res.tpot_ms), res.duration_s,
                       float(np.sum(reqs.input_tokens)), res.num_output_tokens, res.num_steps,
                       engine.num_blocks * BLOCK_SIZE)
    if reqs.arrival_s is None:
        raise SimError(f"several instances on {system.name} are simulated with arrivals: give "
                       "--request-rate, not --concurrency")
    timed = Requests(prompts, outputs, tuple(float(x) for x in reqs.arrival_s))
    if dep.mode == "colocated":
        times = simulate_data_parallel(engine, timed, dep.num_dp)
        mode, devices = f"data parallel x{dep.num_dp} (engine scheduler)", dep.num_dp
    else:
        num_prefill = dep.num_prefill_devices // dep.instance_devices()
        times = simulate_prefill_decode(engine, timed, num_prefill, dep.num_dp)
        mode = f"{num_prefill}P{dep.num_dp}D (engine scheduler)"
        devices = num_prefill + dep.num_dp
    tpot = np.array([t for t in times.tpot_ms if not math.isnan(t)])
    duration = times.end_s - min(timed.arrival_s, default=0.0)
    return _result(system, model, mode, devices, wl.num_requests, np.array(times.ttft_ms), tpot,
                   duration, float(np.sum(reqs.input_tokens)), int(np.sum(reqs.output_tokens)),
                   times.num_steps, engine.num_blocks * BLOCK_SIZE)


def _result(system: System, model: ModelCosts, mode: str, devices: int, num_requests: int,
            ttft_ms: np.ndarray, tpot_ms: np.ndarray, duration_s: float, num_prompt_tokens: float,
            num_output_tokens: int, num_steps: int, kv_tokens: int) -> SimResult:
    tpot = mean_p50_p99(tpot_ms)
    ttft = mean_p50_p99(ttft_ms)
    duration = max(duration_s, 1e-12)
    chips = float(devices)
    return SimResult(
        hardware=system.name, model=model.name, mode=mode, chips=chips,
        devices=devices, decode_chips=chips, prefill_chips=chips, num_requests=num_requests,
        num_finished=num_requests, num_unfinished=0,
        decode_tokens_per_s_per_chip=num_output_tokens / duration / chips,
        prefill_tokens_per_s_per_chip=num_prompt_tokens / duration / chips,
        tokens_per_s_per_chip=num_output_tokens / duration / chips,
        tpot_ms_mean=tpot[0], tpot_ms_p50=tpot[1], tpot_ms_p99=tpot[2],
        ttft_ms_mean=ttft[0], ttft_ms_p50=ttft[1], ttft_ms_p99=ttft[2],
        # Per step of one instance: the instances' steps run side by side.
        decode_step_ms_mean=duration * 1e3 * devices / max(num_steps, 1),
        mean_decode_batch_per_dp=num_output_tokens / max(num_steps, 1),
        kv_capacity_tokens_per_dp=kv_tokens, makespan_s=duration_s, num_events=num_steps)
