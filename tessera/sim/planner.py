"""Deployment search: modes, A:F ratios, batch per group and pool sizes under latency SLOs.

Every candidate is first scored by the steady state of the cost model (one decode step at full
batch with the mean KV length, prefill capacity of the prefill pool, both balanced); the best
few that meet the SLO are then run through the event simulation, whose throughput and p99
latencies are what the planner reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .costmodel import (
    KV_BYTES_PER_ELEMENT,
    PassLoad,
    PoolCost,
    causal_pairs,
    decode_load,
    prefill_load,
)
from .deployment import Deployment, kv_handoff_cost
from .errors import SimError
from .hardware import LOCAL_CHIP, PRECISIONS, System, get_system
from .inputs import check_float, check_int
from .model import ModelCosts, load_model
from .result import SimResult
from .simulator import Scenario, simulate
from .tiers import tier_load_s
from .workload import Workload, hit_tokens

BATCHES = (8, 16, 32, 48, 64, 96, 128, 192, 256)
PREFILL_SHARES = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
AF_RATIOS = (1.0, 2.0, 3.0, 4.0)
PREFILL_TOKENS_PER_DEVICE = (4096, 16384)
LOCAL_PREFILL_TOKENS = (512, 2048)
"""A CPU device computes a few thousand prompt tokens per second: a prefill pass of an
accelerator's budget would hold every prompt behind it for seconds."""
COLOCATED_CHUNK_TOKENS = (256, 2048)


@dataclass(frozen=True)
class Hits:
    """Per prompt of the mean length: tokens not computed (device and tier hits) and, of those,
    the tokens each tier loads (None: no tier hits); see :func:`workload.hit_tokens`."""

    cached: int
    tiers: np.ndarray | None


@dataclass(frozen=True)
class Candidate:
    """A deployment and its steady-state estimate."""

    deployment: Deployment
    tokens_per_s_per_chip: float
    tpot_ms: float
    ttft_ms: float
    chips: float


def _steady(system: System, model: ModelCosts, dep: Deployment, inp: int, out: int,
            hits: Hits = Hits(0, None)) -> Candidate:
    dpc = system.chip.num_devices_per_chip
    cached, new = hits.cached, inp - hits.cached  # a prompt's computed tokens follow its hits
    dep.validate(system, model)
    dcost = PoolCost(system, model, dep.decode_layout(model))
    kv = inp + out / 2.0
    b = float(dep.batch_per_dp)
    if dcost.kv_capacity_tokens() < b * (inp + out):
        raise SimError("batch does not fit the KV cache")
    groups = np.full(dep.num_dp, b)
    q = 2 if dep.mtp_acceptance is not None else 1
    gain = 1.0 + (dep.mtp_acceptance or 0.0)
    load = decode_load(model, groups, groups * kv, q)
    mtp = decode_load(model, groups, groups * kv, 1) if q > 1 else None
    one = np.ones(1)
    if dep.mode == "colocated":
        # Each step also prefills the prompts that replace finishing sequences. Prompts arrive
        # whole in one group, so the groups that prefill in a step carry a full chunk each and,
        # in lock step, set the pace for every group. When all groups together cannot prefill
        # a chunk each fast enough, prefill bounds the output rate.
        chunk = float(min(dep.chunk_tokens_per_group, new))
        decode_per_step = dep.num_dp * b * gain
        prefill_bound = dep.num_dp * chunk / new * out
        out_per_step = min(decode_per_step, prefill_bound)
        prompts_per_step = out_per_step / out
        busy = min(float(dep.num_dp), prompts_per_step * new / chunk)
        n_busy = max(1, math.ceil(busy))
        pre_tok = np.zeros(dep.num_dp)
        pre_tok[:n_busy] = chunk * busy / n_busy
        pre = prefill_load(model, pre_tok, pre_tok * (pre_tok + 1) / 2.0 + pre_tok * (new - chunk) / 2.0,
                           pre_tok / new)
        if cached:
            pre = _with_cached(model, pre, pre_tok * cached, cached, pre_tok / new)
        step = dcost.step_s(PassLoad(load.tokens + pre.tokens, load.core_flops + pre.core_flops,
                                     load.kv_bytes + pre.kv_bytes, load.sampled + pre.sampled), mtp)
        if hits.tiers is not None:  # a busy group loads the hits of the prompts it starts
            step += tier_load_s(hits.tiers * (prompts_per_step / n_busy),
                                dcost.kv_bytes_per_token(), system.tiers())
        tokens_s = out_per_step / step
        ttft = step * max(1.0, new / dep.chunk_tokens_per_group)
    else:
        step = dcost.step_s(load, mtp)
        decode_tokens_s = dep.num_dp * b * gain / step
        pcost = PoolCost(system, model, dep.prefill_layout(model))
        inst = dep.instance_devices()
        n_seq = max(1, dep.prefill_tokens_per_device * inst // new)
        g = pcost.layout.num_groups
        pl = prefill_load(model, one.repeat(g) * n_seq * new / g,
                          one.repeat(g) * n_seq * causal_pairs(new, float(cached)) / g,
                          one.repeat(g) * n_seq / g)
        if cached:
            pl = _with_cached(model, pl, 0.0, cached, pl.sampled)
        pre_s = pcost.step_s(pl)
        if hits.tiers is not None:
            pre_s += tier_load_s(hits.tiers * (n_seq / g), pcost.kv_bytes_per_token(),
                                 system.tiers())
        prefill_req_s = n_seq / pre_s * (dep.num_prefill_devices // inst)
        tokens_s = min(decode_tokens_s, prefill_req_s * out)
        per_token_s, latency_s = kv_handoff_cost(system, model, dep)
        ttft = pre_s + latency_s + per_token_s * inp
    return Candidate(dep, tokens_s / (dep.num_devices / dpc), step / gain * 1e3, ttft * 1e3,
                     dep.num_devices / dpc)


def _with_cached(model: ModelCosts, load: PassLoad, extra_pairs: np.ndarray | float,
                 cached: int, num_prompts: np.ndarray) -> PassLoad:
    """``load`` of ``num_prompts`` prompts after ``cached`` hit tokens each: their
    ``extra_pairs`` (query, key) pairs over the cached prefix that ``load`` leaves out, the
    cached KV read once per prompt and (MLA) its latents re-expanded, as
    :func:`costmodel.prefill_core_flops` charges them."""
    kvb = model.kv_elements_per_token * KV_BYTES_PER_ELEMENT
    flops = (model.attn_flops_per_pair_prefill * extra_pairs
             + model.kv_up_flops_per_context_token * cached * num_prompts)
    return replace(load, core_flops=load.core_flops + flops,
                   kv_bytes=load.kv_bytes + kvb * cached * num_prompts)


def check_chips(system: System, num_chips: object) -> int:
    """Return ``num_chips`` if ``system`` has that many chips; else raise SimError."""
    return check_int("--chips", num_chips, 1, system.num_chips)


def _check_inputs(system: System, model: ModelCosts, precision: str, tpot_slo_ms: float,
                  ttft_slo_ms: float | None, input_tokens: int, output_tokens: int,
                  mtp: float | None, top: int, verify: int, hits: Workload | None) -> None:
    # Every candidate would fail alike on these; checked once so the error names the input
    # instead of "no deployment fits" after the whole search.
    check_float("--tpot-slo-ms", tpot_slo_ms, 0.0, min_open=True)
    if ttft_slo_ms is not None:
        check_float("--ttft-slo-ms", ttft_slo_ms, 0.0, min_open=True)
    check_int("--input-tokens", input_tokens)
    check_int("--output-tokens", output_tokens)
    if precision not in PRECISIONS:
        raise SimError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    system.chip.matmul_flops_per_s(precision)
    if mtp is not None:
        check_float("--mtp-acceptance", mtp, 0.0, 1.0)
        if model.num_mtp_layers < 1:
            raise SimError(f"{model.name} has no MTP layers (num_nextn_predict_layers)")
    check_int("--top", top, 0)
    check_int("verify", verify, 0)
    if hits is not None:
        hits.validate()


def candidates(system: System, model: ModelCosts, num_chips: int, precision: str,
               mtp: float | None) -> list[Deployment]:
    """Deployments to try on ``num_chips`` chips.

    On the calibrated local machine only what Tessera's runtime launches there is tried
    (``tessera serve --deployment``): instances of one device, no attention/FFN split behind
    prefill instances."""
    check_chips(system, num_chips)
    devices = num_chips * system.chip.num_devices_per_chip
    local = system.name == LOCAL_CHIP
    out: list[Deployment] = []
    tps = [t for t in (1, 2, 4, 8) if devices % t == 0] if not (model.is_moe or local) else [1]
    base = Deployment(mode="colocated", precision=precision, mtp_acceptance=mtp,
                      num_micro_batches=2 if model.is_moe else 1,
                      num_redundant_experts=32 if model.is_moe else 0)
    for b in BATCHES:
        for tp in tps:
            for chunk in COLOCATED_CHUNK_TOKENS:
                out.append(replace(base, num_dp=devices // tp, tp=tp, batch_per_dp=b,
                                   chunk_tokens_per_group=chunk))
            for share in PREFILL_SHARES:
                pre = int(devices * share) // tp * tp
                # largest instance of at most 32 devices that splits the pool evenly
                sizes = [d for d in range(tp, min(pre, 1 if local else 32) + 1, tp)
                         if pre % d == 0]
                if not sizes:
                    continue
                inst = sizes[-1]
                dec = devices - pre
                for budget in LOCAL_PREFILL_TOKENS if local else PREFILL_TOKENS_PER_DEVICE:
                    out.append(replace(base, mode="pd", num_dp=dec // tp, tp=tp, batch_per_dp=b,
                                       num_prefill_devices=pre, prefill_instance_devices=inst,
                                       prefill_tokens_per_device=budget))
                if not model.is_moe or local:
                    continue
                for ratio in AF_RATIOS:
                    ffn = int(dec / (1.0 + ratio))
                    if ffn < 1:
                        continue
                    for mb, budget in ((2, 4096), (2, 16384), (3, 16384)):
                        out.append(replace(base, mode="afd", num_dp=dec - ffn, batch_per_dp=b,
                                           num_ffn_devices=ffn, num_micro_batches=mb,
                                           num_prefill_devices=pre, prefill_instance_devices=inst,
                                           prefill_tokens_per_device=budget))
    # Prefill shares that round to the same pool on few devices give the same deployment.
    return list(dict.fromkeys(out))


def plan(hardware: str, model_name: str, num_chips: int, tpot_slo_ms: float,
         ttft_slo_ms: float | None, input_tokens: int, output_tokens: int,
         precision: str | None = None, mtp: float | None = None, top: int = 5,
         verify: int = 3, hits: Workload | None = None, num_systems: int = 1,
         ) -> tuple[list[tuple[Candidate, SimResult | None]], list[Candidate]]:
    """Search deployments; return (best verified, every feasible candidate).

    ``hits`` carries the workload's prefix and tier hit fractions and ``num_sessions`` (its
    other fields are ignored): candidates are scored with them, and the simulated results of
    the verified ones size the tiers. ``num_systems`` systems like ``hardware`` side by side
    hold ``num_chips`` (``System.num_systems``). Raises :class:`SimError` for unknown hardware
    or models and bad numbers before searching."""
    system = get_system(hardware, num_systems)
    model = load_model(model_name)
    check_chips(system, num_chips)
    if precision is None and system.name == LOCAL_CHIP:
        precision = "fp32"  # what the engine runs fast on a CPU
    elif precision is None:
        precision = "int8" if "fp8" not in system.chip.tflops else "fp8"
    _check_inputs(system, model, precision, tpot_slo_ms, ttft_slo_ms, input_tokens,
                  output_tokens, mtp, top, verify, hits)
    mean = Hits(0, None)
    if hits is not None:
        cached, tiers = hit_tokens(hits, np.array([input_tokens]))
        mean = Hits(int(cached[0]), None if tiers is None else tiers[0])
    feasible: list[Candidate] = []
    for dep in candidates(system, model, num_chips, precision, mtp):
        try:
            feasible.append(_steady(system, model, dep, input_tokens, output_tokens, mean))
        except SimError:
            continue
    if not feasible:
        raise SimError(f"no deployment of {model_name} fits on {num_chips} chips of {hardware}")
    ok = [c for c in feasible if c.tpot_ms <= tpot_slo_ms
          and (ttft_slo_ms is None or c.ttft_ms <= ttft_slo_ms)]
    ok.sort(key=lambda c: (-round(c.tokens_per_s_per_chip, 1), c.tpot_ms, c.ttft_ms))
    best: list[tuple[Candidate, SimResult | None]] = []
    for i, cand in enumerate(ok[:top]):
        res = None
        if i < verify:
            rate = cand.tokens_per_s_per_chip * cand.chips / output_tokens * 0.9
            conc = cand.deployment.num_dp * cand.deployment.batch_per_dp
            lifetime_s = (cand.ttft_ms + cand.tpot_ms * output_tokens) / 1e3
            num = int(min(max(2 * conc, 400, 4 * rate * lifetime_s), 60000))
            wl = Workload(num_requests=num, input_tokens=input_tokens,
                          output_tokens=output_tokens, request_rate_per_s=rate)
            if hits is not None:
                wl = replace(wl, prefix_hit_fraction=hits.prefix_hit_fraction,
                             host_hit_fraction=hits.host_hit_fraction,
                             ssd_hit_fraction=hits.ssd_hit_fraction,
                             remote_hit_fraction=hits.remote_hit_fraction,
                             num_sessions=hits.num_sessions)
            res = simulate(Scenario(hardware, model_name, cand.deployment, wl,
                                    num_systems=num_systems))
        best.append((cand, res))
    return best, feasible


def describe(dep: Deployment) -> str:
    """Short text for a deployment."""
    text = f"{dep.mode} dp={dep.num_dp}"
    if dep.tp > 1:
        text += f" tp={dep.tp}"
    if dep.mode == "afd":
        text += f" ffn={dep.num_ffn_devices} mb={dep.num_micro_batches}"
    if dep.mode != "colocated":
        text += f" prefill={dep.num_prefill_devices} ({dep.prefill_tokens_per_device} tok/dev)"
    else:
        text += f" chunk={dep.chunk_tokens_per_group}"
    return text + f" batch/dp={dep.batch_per_dp}"
