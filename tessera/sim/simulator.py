"""The serving simulation: requests flow through prefill and decode pools on an event heap.

Decode runs as iteration-level events per pool (all data-parallel groups of a pool step in lock
step, bound together by the expert all-to-all), so the cost of a run grows with the number of
steps, not with tokens times requests. Prefill instances (pd/afd) are separate servers whose
batches are events; the KV cache then travels to the decode pool over the fabric.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from .batching import DecodeSlots
from .costmodel import PassLoad, PoolCost, decode_load, prefill_core_flops
from .deployment import Deployment, kv_handoff_cost
from .errors import SimError
from .events import Event, EventLoop
from .hardware import LOCAL_CHIP, System, get_system
from .inputs import check_int
from .kvsizing import size_tiers
from .metrics import Recorder
from .model import ModelCosts, load_model
from .result import SimResult
from .tiers import tier_load_s
from .workload import Requests, Workload, generate


@dataclass(frozen=True)
class Scenario:
    """Everything one simulation needs: hardware, model, deployment and workload.

    Construction raises :class:`SimError` for values no system could run (zero or negative
    counts, non-finite rates, a negative seed); what depends on the system and model (device
    counts, memory) is checked by :func:`simulate`."""

    hardware: str
    model: str
    deployment: Deployment
    workload: Workload
    seed: int = 0
    num_systems: int = 1
    """Systems like ``hardware`` side by side (pools may span them; see ``System``)."""

    def __post_init__(self) -> None:
        for name, value in (("hardware", self.hardware), ("model", self.model)):
            if not isinstance(value, str) or not value:
                raise SimError(f"{name} must be a non-empty name (got {value!r})")
        if not isinstance(self.deployment, Deployment):
            raise SimError(f"deployment must be a Deployment (got {type(self.deployment).__name__})")
        if not isinstance(self.workload, Workload):
            raise SimError(f"workload must be a Workload (got {type(self.workload).__name__})")
        check_int("--seed", self.seed, 0)
        check_int("--systems", self.num_systems, 1)
        self.deployment.check_numbers()
        self.workload.validate()


def _sum_loads(a: PassLoad, b: PassLoad) -> PassLoad:
    return PassLoad(tokens=a.tokens + b.tokens, core_flops=a.core_flops + b.core_flops,
                    kv_bytes=a.kv_bytes + b.kv_bytes, sampled=a.sampled + b.sampled)


class _Run:
    """State of one simulation run (built by :func:`simulate`)."""

    def __init__(self, scenario: Scenario, system: System, model: ModelCosts) -> None:
        dep = scenario.deployment
        self.dep, self.model, self.system = dep, model, system
        self.reqs: Requests = generate(scenario.workload, scenario.seed)
        self.num = scenario.workload.num_requests
        self.concurrency = scenario.workload.concurrency or 0
        self.loop = EventLoop()
        self.rng = np.random.default_rng(scenario.seed + 1)
        self.decode_cost = PoolCost(system, model, dep.decode_layout(model))
        self.kv_capacity = self.decode_cost.kv_capacity_tokens()
        self.slots = DecodeSlots(dep.num_dp, dep.batch_per_dp, self.kv_capacity)
        self.rec = Recorder(self.num)
        self.issued = 0
        self.waiting: deque[int] = deque()
        self.decode_busy = False
        self.q_per_seq = 2 if dep.mtp_acceptance is not None else 1
        self.colocated = dep.mode == "colocated"
        if self.colocated:
            self.group_prefill: list[deque[list[int]]] = [deque() for _ in range(dep.num_dp)]
            self.num_prefilling = 0
            self.pending_load_s: dict[int, float] = {}
            """Per device, tier loads of admitted prompts whose first chunk has not run."""
        else:
            self.prefill_cost = PoolCost(system, model, dep.prefill_layout(model))
            self.prefill_cost.kv_capacity_tokens()
            self.num_instances = dep.num_prefill_devices // dep.instance_devices()
            self.instance_busy = [False] * self.num_instances
            self.prefill_queue: deque[int] = deque()
        self.kv_transfer_s_per_token, self.kv_latency_s = kv_handoff_cost(system, model, dep)

    # ----- arrivals ----------------------------------------------------------------------------
    def start(self) -> None:
        reqs = self.reqs
        final = int((reqs.decode_start_context + reqs.output_tokens).max())
        if not self.slots.can_ever_fit(final):
            raise SimError(f"a sequence of {final} tokens exceeds the KV capacity of one DP group"
                           f" ({self.kv_capacity} tokens); lower lengths or raise --tp")
        if reqs.arrival_s is not None:
            for rid in range(self.num):
                self.loop.schedule(float(reqs.arrival_s[rid]), self._on_arrival, rid)
            self.issued = self.num
        else:
            conc = min(self.num, int(self.concurrency))
            for rid in range(conc):
                self.loop.schedule(0.0, self._on_arrival, rid)
            self.issued = conc

    def _on_arrival(self, now: float, rid: int) -> list[Event]:
        self.rec.arrival[rid] = now
        if self.colocated:
            self.waiting.append(rid)
            self._admit_colocated()
            return self._kick_decode(now)
        self.prefill_queue.append(rid)
        return self._kick_prefill(now)

    def _issue_next(self, now: float, count: int) -> list[Event]:
        events = []
        while count > 0 and self.issued < self.num and self.reqs.arrival_s is None:
            events.append(self.loop.make(now, self._on_arrival, self.issued))
            self.issued += 1
            count -= 1
        return events

    def _finish(self, now: float, rids: np.ndarray) -> list[Event]:
        self.rec.finish[rids] = now
        return self._issue_next(now, int(rids.size))

    # ----- prefill pool (pd / afd) -----------------------------------------------------------------
    def _kick_prefill(self, now: float) -> list[Event]:
        events = []
        budget = self.dep.prefill_tokens_per_device * self.dep.instance_devices()
        for i in range(self.num_instances):
            if self.instance_busy[i] or not self.prefill_queue:
                continue
            batch: list[int] = []
            used = 0
            while self.prefill_queue:
                rid = self.prefill_queue[0]
                new = int(self.reqs.input_tokens[rid] - self.reqs.cached_tokens[rid])
                if batch and used + new > budget:
                    break
                batch.append(self.prefill_queue.popleft())
                used += new
            self.instance_busy[i] = True
            dur = self._prefill_batch_s(batch)
            events.append(self.loop.make(now + dur, self._on_prefill_done, (i, batch, used)))
        return events

    def _prefill_batch_s(self, batch: list[int]) -> float:
        r = self.reqs
        new = r.input_tokens[batch] - r.cached_tokens[batch]
        flops = float(sum(prefill_core_flops(self.model, float(n), float(c)) for n, c in zip(
            new, r.cached_tokens[batch], strict=True)))
        groups = self.prefill_cost.layout.num_groups
        share = np.full(groups, 1.0 / groups)
        # KV traffic: the new tokens' KV written, the cached prefix's read by their attention.
        kv_tokens = float(r.input_tokens[batch].sum())
        load = PassLoad(tokens=share * float(new.sum()), core_flops=share * flops,
                        kv_bytes=share * kv_tokens * self.decode_cost.kv_bytes_per_token_layer,
                        sampled=share * len(batch))
        step = self.prefill_cost.step_s(load, load if self.dep.mtp_acceptance is not None else None)
        if r.tier_tokens is None:
            return step
        # Each group loads its share of the batch's tier hits before the step reads them.
        return step + tier_load_s(r.tier_tokens[batch] / groups,
                                  self.prefill_cost.kv_bytes_per_token(), self.system.tiers())

    def _on_prefill_done(self, now: float, payload: tuple[int, list[int], int]) -> list[Event]:
        i, batch, used = payload
        self.instance_busy[i] = False
        self.rec.prefill_done(now, float(used))
        events: list[Event] = []
        done_now = []
        for rid in batch:
            self.rec.prefilled[rid] = now
            if self.reqs.output_tokens[rid] <= 1:
                self.rec.first_token[rid] = now
                done_now.append(rid)
                continue
            kv_s = self.kv_latency_s + self.kv_transfer_s_per_token * float(self.reqs.input_tokens[rid])
            events.append(self.loop.make(now + kv_s, self._on_kv_ready, rid))
        if done_now:
            events += self._finish(now, np.array(done_now, dtype=np.int64))
        return events + self._kick_prefill(now)

    def _on_kv_ready(self, now: float, rid: int) -> list[Event]:
        self.waiting.append(rid)
        if self.decode_busy:
            # Joins at the step boundary (``_on_step_done``): a sequence placed now would be
            # counted as generating a token in a step that started without it.
            return []
        self._admit_decode(now)
        return self._kick_decode(now)

    def _admit_decode(self, now: float) -> None:
        """Move prefilled requests whose KV has arrived into free decode slots, in order.

        The first token reaches the user when the decode pool takes the request and streams it
        (as in SGLang's and vLLM's disaggregated serving), so a wait for a decode slot counts
        in TTFT, and TPOT is the decode pool's pace.
        """
        while self.waiting:
            r = self.waiting[0]
            ctx = int(self.reqs.decode_start_context[r])
            if self.slots.admit(r, ctx, int(self.reqs.output_tokens[r]) - 1) < 0:
                break
            self.waiting.popleft()
            self.rec.first_token[r] = now

    # ----- colocated admission ------------------------------------------------------------------
    def _admit_colocated(self) -> None:
        r = self.reqs
        while self.waiting:
            rid = self.waiting[0]
            g = self.slots.admit(rid, int(r.decode_start_context[rid]),
                                 max(int(r.output_tokens[rid]) - 1, 0), ready=False)
            if g < 0:
                break
            self.waiting.popleft()
            new = int(r.input_tokens[rid] - r.cached_tokens[rid])
            self.group_prefill[g].append([rid, new, int(r.cached_tokens[rid])])
            if r.tier_tokens is not None:
                self.pending_load_s[rid] = tier_load_s(
                    r.tier_tokens[rid], self.decode_cost.kv_bytes_per_token(), self.system.tiers())
            self.num_prefilling += 1

    # ----- decode pool ------------------------------------------------------------------------------
    def _kick_decode(self, now: float) -> list[Event]:
        if self.decode_busy:
            return []
        if self.slots.total_active == 0 and not (self.colocated and self.num_prefilling):
            return []
        return self._start_step(now)

    def _start_step(self, now: float) -> list[Event]:
        seqs, ctx = self.slots.group_loads()
        load = decode_load(self.model, seqs, ctx, self.q_per_seq)
        completed: list[int] = []
        chunk_tokens = load_s = 0.0
        if self.colocated and self.num_prefilling:
            load, completed, chunk_tokens, load_s = self._prefill_chunks(load)
        mtp = decode_load(self.model, seqs, ctx, 1) if self.q_per_seq > 1 else None
        if not seqs.any() and not chunk_tokens:
            self.decode_busy = False
            return []
        dur = self.decode_cost.step_s(load, mtp)
        if load_s:
            dur += load_s  # the slowest group's tier loads, before the step's compute
        self.decode_busy = True
        self.rec.decode_step_started(dur, float(seqs.mean()))
        return [self.loop.make(now + dur, self._on_step_done, (completed, chunk_tokens))]

    def _prefill_chunks(self, load: PassLoad) -> tuple[PassLoad, list[int], float, float]:
        """Add each group's next prompt chunks to ``load``; also return the prompts finished,
        the tokens computed and the tier loads the step waits for (its slowest group's)."""
        groups = self.dep.num_dp
        tokens, flops, sampled = np.zeros(groups), np.zeros(groups), np.zeros(groups)
        kv_tokens, loads = np.zeros(groups), np.zeros(groups)
        completed: list[int] = []
        for g in range(groups):
            queue = self.group_prefill[g]
            budget = self.dep.chunk_tokens_per_group
            while queue and budget > 0:
                item = queue[0]
                take = min(budget, item[1])
                # a prompt's tier hits load before the step of its first chunk
                loads[g] += self.pending_load_s.pop(item[0], 0.0)
                tokens[g] += take
                flops[g] += prefill_core_flops(self.model, take, item[2])
                kv_tokens[g] += take + item[2]
                item[1] -= take
                item[2] += take
                budget -= take
                if item[1] <= 0:
                    queue.popleft()
                    completed.append(item[0])
                    sampled[g] += 1
        kvb = self.decode_cost.kv_bytes_per_token_layer
        pre = PassLoad(tokens=tokens, core_flops=flops, kv_bytes=kv_tokens * kvb, sampled=sampled)
        return _sum_loads(load, pre), completed, float(tokens.sum()), float(loads.max())

    def _on_step_done(self, now: float, payload: tuple[list[int], float]) -> list[Event]:
        completed, chunk_tokens = payload
        gen = np.ones(self.slots.request.shape)
        if self.q_per_seq > 1:
            p = float(self.dep.mtp_acceptance or 0.0)
            gen += self.rng.random(gen.shape) < p
        finished, emitted = self.slots.advance(gen)
        self.rec.decode_step_done(now, emitted)
        events = self._finish(now, finished) if finished.size else []
        if chunk_tokens:
            self.rec.prefill_done(now, chunk_tokens)
        done_now = []
        for rid in completed:
            self.num_prefilling -= 1
            self.rec.first_token[rid] = self.rec.prefilled[rid] = now
            if self.reqs.output_tokens[rid] <= 1:
                done_now.append(rid)
            self.slots.mark_ready(rid)
        if done_now:
            self.slots.advance(np.zeros(self.slots.request.shape))
            events += self._finish(now, np.array(done_now, dtype=np.int64))
        if self.colocated:
            self._admit_colocated()
        else:
            self._admit_decode(now)
        self.decode_busy = False
        return events + self._kick_decode(now)

    # ----- results -----------------------------------------------------------------------------------
    def result(self, scenario: Scenario) -> SimResult:
        dep = self.dep
        per_chip = self.system.chip.num_devices_per_chip
        chips = dep.num_devices / per_chip
        decode_chips = dep.num_decode_devices / per_chip
        prefill_chips = chips if self.colocated else dep.num_prefill_devices / per_chip
        summ = self.rec.summarize(self.reqs.output_tokens)
        result = SimResult(
            hardware=scenario.hardware, model=scenario.model, mode=dep.mode, chips=chips,
            devices=dep.num_devices, decode_chips=decode_chips, prefill_chips=prefill_chips,
            num_requests=self.num, num_finished=summ.num_finished,
            num_unfinished=self.num - summ.num_finished,
            decode_tokens_per_s_per_chip=summ.decode_tokens_per_s / decode_chips,
            prefill_tokens_per_s_per_chip=summ.prefill_tokens_per_s / prefill_chips,
            tokens_per_s_per_chip=summ.decode_tokens_per_s / chips,
            tpot_ms_mean=summ.tpot_ms[0], tpot_ms_p50=summ.tpot_ms[1], tpot_ms_p99=summ.tpot_ms[2],
            ttft_ms_mean=summ.ttft_ms[0], ttft_ms_p50=summ.ttft_ms[1], ttft_ms_p99=summ.ttft_ms[2],
            decode_step_ms_mean=summ.decode_step_ms_mean,
            mean_decode_batch_per_dp=summ.mean_decode_batch_per_dp,
            kv_capacity_tokens_per_dp=self.kv_capacity, makespan_s=summ.makespan_s,
            num_events=self.loop.num_processed)
        sizing = size_tiers(self.system, self.model, dep, scenario.workload,
                            self._in_flight(scenario.workload.request_rate_per_s))
        if sizing is None:
            return result
        return replace(result, tier_sessions=sizing.num_sessions, tier_nodes=sizing.num_nodes,
                       host_tier_bytes_per_node=sizing.host_bytes_per_node,
                       ssd_tier_bytes_per_node=sizing.ssd_bytes_per_node,
                       remote_tier_bytes=sizing.remote_bytes)

    def _in_flight(self, rate_per_s: float | None) -> float:
        """Mean requests in flight: the closed loop's concurrency, or (Little's law) the
        arrival rate times the mean time a finished request spent in the system."""
        if rate_per_s is None:
            return float(min(self.concurrency, self.num))
        done = ~np.isnan(self.rec.finish)
        if not done.any():
            return 0.0
        return rate_per_s * float(np.mean(self.rec.finish[done] - self.rec.arrival[done]))


def simulate(scenario: Scenario, max_events: int | None = None) -> SimResult:
    """Simulate ``scenario`` and return its :class:`SimResult`.

    Raises :class:`~tessera.sim.errors.SimError` for unknown hardware or models, deployments
    that need more devices than the system has or do not fit in memory, and bad numbers.
    Requests still in flight when ``max_events`` is reached are reported as unfinished.
    """
    system = get_system(scenario.hardware, scenario.num_systems)
    model = load_model(scenario.model)
    scenario.deployment.validate(system, model)
    scenario.workload.validate()
    dep = scenario.deployment
    if (system.name == LOCAL_CHIP and dep.mode != "afd" and dep.tp == 1
            and (dep.mode == "colocated" or dep.instance_devices() == 1)):
        if any(scenario.workload.tier_fractions().values()):
            raise SimError("KV tier hits are not simulated on the engine scheduler's path"
                           f" ({LOCAL_CHIP} instances): drop --host-hit, --ssd-hit"
                           " and --remote-hit")
        from .local import simulate_local

        return simulate_local(scenario, system, model)
    run = _Run(scenario, system, model)
    run.start()
    run.loop.run(max_events)
    return run.result(scenario)
