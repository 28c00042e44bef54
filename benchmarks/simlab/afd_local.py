"""Tessera's attention/FFN split (``tessera.afd``) on one host, on a virtual clock.

One attention worker and one FFN worker, each a single device (one core here, with the cost
model calibrated for one thread), and M lanes: the attention worker's micro-batches, each its
own engine :class:`Scheduler` over one shared :class:`BlockManager`, stepping on their own as
``tessera.afd.lanes`` does. The order of work is the real one:

* the attention worker resumes the lanes in turn, passing over a lane whose FFN result is not
  in yet; when every lane waits it blocks on the oldest request. A resumed lane runs the next
  layer's attention unit and submits that layer's FFN, or, after the last layer, runs the LM
  head, samples and ends its step; an idle lane schedules its next step when its turn comes;
* the FFN worker serves requests in arrival order, one at a time;
* a request and its result each take ``transfer_latency_s`` plus two copies of their bytes to
  arrive (the data plane: into shared memory and out of it);
* with a share of the LM head on the FFN worker (``AFDConfig.ffn_head_share``) a lane past its
  last layer submits the sampled rows there, computes its own vocabulary rows, and samples on
  its next turn once the remote logits have arrived.

So what the split costs and gains falls out of the schedule: with M=1 the two workers take
turns; with M=2 one lane's FFN runs under the other's attention, while each lane re-reads the
weights over half the rows. Unit times come from the same roofline :class:`PoolCost` as every
other scenario; each worker pays the per-op launch cost of its own ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tessera.afd.lane_policy import pick_lane
from tessera.config import CacheConfig, SchedulerConfig
from tessera.engine.block_manager import BlockManager
from tessera.engine.scheduler import Scheduler, SchedulerOutput
from tessera.sim.costmodel import PoolCost, PoolLayout
from tessera.sim.engine_sim import EngineSimResult, StepLoad, end_step, make_sequences, step_load
from tessera.sim.errors import SimError
from tessera.sim.hardware import System
from tessera.sim.model import ModelCosts

_SCHEDULER = SchedulerConfig()
"""The engine's defaults, which the split's limits default to."""

FFN_OPS_PER_LAYER = 3
"""Ops of an FFN unit on its worker (gate/up projection, activation and product, down
projection); the attention worker runs the rest of a layer's ops."""


@dataclass(frozen=True)
class AFDLocalScenario:
    """One attention worker and one FFN worker serving requests that all arrive at once."""

    system: System
    """Calibrated for one device per worker (on a CPU: one thread)."""
    model: ModelCosts
    precision: str
    prompt_tokens: tuple[int, ...]
    output_tokens: tuple[int, ...]
    num_blocks: int
    num_micro_batches: int
    transfer_latency_s: float
    """One-way time of a small data-plane message (request or result), from send to receipt."""
    copy_bytes_per_s: float = math.inf
    """Memory copy rate; a message's bytes are copied twice (into the plane and out of it)."""
    kv_bytes_per_element: float = 4.0
    ffn_head_share: float = 0.0
    """Share of the LM head's vocabulary computed on the FFN worker."""
    block_size: int = CacheConfig().block_size
    max_num_seqs: int = _SCHEDULER.max_num_seqs
    max_num_batched_tokens: int = _SCHEDULER.max_num_batched_tokens


@dataclass
class SimLane:
    """One lane of the attention worker: its own scheduler, and where its step stands."""

    scheduler: Scheduler
    out: SchedulerOutput | None = None
    load: StepLoad | None = None
    layer: int = 0
    ready_s: float = 0.0  # when the pending FFN result arrives
    sent: int = 0  # order of the lane's last submit among all submits


class _UnitCosts:
    """Seconds of each piece of a lane step, from the pool cost model (one device each)."""

    def __init__(self, system: System, model: ModelCosts, precision: str) -> None:
        layout = PoolLayout(num_groups=1, tp=1, num_ep=1, ffn_split=True, num_micro_batches=1,
                            precision=precision)
        self.pool = PoolCost(system, model, layout)
        eff = system.chip.efficiency
        self.model = model
        op_s = self.op_s = eff.op_overhead_us * 1e-6
        self.attn_ops_s = max(eff.ops_per_layer - FFN_OPS_PER_LAYER, 0) * op_s
        self.ffn_ops_s = FFN_OPS_PER_LAYER * op_s
        self.step_s = eff.step_overhead_ms * 1e-3
        self.seq_s = system.host.seq_overhead_us * 1e-6

    def attention(self, load: StepLoad) -> float:
        """One layer's attention side (the unit, the FFN's input norm, the submit)."""
        n = self.model.num_layers
        return (self.pool.attention_unit_s(load.num_tokens, load.attention_flops / n,
                                           load.kv_bytes / n, load.num_sampled)
                + self.attn_ops_s)

    def ffn(self, load: StepLoad, layer: int) -> float:
        """Layer ``layer``'s FFN unit (its dense FFN or its experts) on the FFN worker."""
        return (self.pool.ffn_unit_s(load.num_tokens, self.model.is_moe_layer(layer))
                + self.ffn_ops_s)

    def head(self, load: StepLoad, share: float) -> float:
        """``share`` of the LM head's vocabulary rows over the step's sampled rows."""
        return share * self.pool.head_s(load.num_sampled)

    def tail(self, load: StepLoad) -> float:
        """The step's end on the attention worker after the LM head: sampling and host
        bookkeeping."""
        return self.step_s + load.num_seqs * self.seq_s


def simulate_afd_local(sc: AFDLocalScenario, max_rounds: int = 10_000_000) -> EngineSimResult:
    """Run the scenario to completion; every request finishes or this raises."""
    num = len(sc.prompt_tokens)
    if len(sc.output_tokens) != num or min(sc.output_tokens, default=1) < 1:
        raise SimError("every request needs a prompt length and at least one output token")
    if sc.num_micro_batches < 1:
        raise SimError("num_micro_batches must be at least 1")
    costs = _UnitCosts(sc.system, sc.model, sc.precision)
    bm = BlockManager(sc.num_blocks, sc.block_size, True)
    per_lane = SchedulerConfig(max_num_seqs=sc.max_num_seqs,
                               max_num_batched_tokens=sc.max_num_batched_tokens,
                               ).per_lane(sc.num_micro_batches)
    lanes = [SimLane(Scheduler(per_lane, bm)) for _ in range(sc.num_micro_batches)]
    for seq in make_sequences(sc.prompt_tokens, sc.output_tokens):
        # A new request joins the lane the attention worker's lanes would pick for it.
        unfinished = [len(ln.scheduler.running) + len(ln.scheduler.waiting) for ln in lanes]
        lanes[pick_lane(unfinished)].scheduler.add(seq)
    first = [math.nan] * num
    finish = [math.nan] * num
    attn_s = ffn_s = 0.0  # when each worker is next free
    num_steps = num_out = 0
    num_layers = sc.model.num_layers
    hidden_bytes = sc.model.hidden_size * sc.kv_bytes_per_element  # activations in the KV dtype
    copy_rate = sc.copy_bytes_per_s
    share = sc.ffn_head_share
    if not 0.0 <= share <= 1.0:
        raise SimError("ffn_head_share must be from 0 to 1")
    num_sent = 0

    def hop_s(num_bytes: float) -> float:
        """A message's time from send to receipt: latency plus two copies of its bytes."""
        return sc.transfer_latency_s + 2.0 * num_bytes / copy_rate

    def resume(lane: SimLane) -> None:
        """Run ``lane`` until its next submit or the end of its step (on the attention worker),
        its FFN result being in."""
        nonlocal attn_s, ffn_s, num_steps, num_out, num_sent
        attn_s = max(attn_s, lane.ready_s)  # (a new step's ready_s is in the past)
        out, load = lane.out, lane.load
        assert out is not None and load is not None
        num_sent += 1
        lane.sent = num_sent
        if lane.layer < num_layers:
            attn_s += costs.attention(load)
            hop = hop_s(load.num_tokens * hidden_bytes)
            ffn_start = max(ffn_s, attn_s + hop)
            ffn_s = ffn_start + costs.ffn(load, lane.layer)
            lane.ready_s = ffn_s + hop
            lane.layer += 1
            return
        if lane.layer == num_layers:
            # The head: the remote share is submitted first, the local share runs meanwhile.
            lane.layer += 1
            if share > 0.0 and load.num_sampled > 0:
                ffn_start = max(ffn_s, attn_s + hop_s(load.num_sampled * hidden_bytes))
                ffn_s = ffn_start + costs.head(load, share) + costs.op_s
                logits_bytes = share * sc.model.vocab_size * sc.kv_bytes_per_element
                lane.ready_s = ffn_s + hop_s(load.num_sampled * logits_bytes)
                attn_s += costs.head(load, 1.0 - share)
                return  # samples when resumed, once the remote logits are in
            attn_s += costs.head(load, 1.0)
        attn_s += costs.tail(load)
        num_steps += 1
        num_out += len(end_step(lane.scheduler, out, attn_s, sc.output_tokens, first, finish))
        lane.out = lane.load = None

    for _ in range(max_rounds):
        if not any(ln.out is not None or ln.scheduler.has_unfinished() for ln in lanes):
            break
        progressed = False
        for lane in lanes:
            if lane.out is None:
                if not lane.scheduler.has_unfinished():
                    continue
                out = lane.scheduler.schedule()
                if out.is_empty:
                    continue  # waiting for KV blocks another lane holds
                lane.out, lane.layer, lane.ready_s = out, 0, 0.0
                lane.load = step_load(sc.model, out, sc.kv_bytes_per_element)
            elif lane.ready_s > attn_s:
                continue  # its result is not in yet: passed over
            resume(lane)
            progressed = True
        if not progressed:
            waiting = [ln for ln in lanes if ln.out is not None]
            if not waiting:
                raise SimError("the lanes made no progress (KV pool too small?)")
            resume(min(waiting, key=lambda ln: ln.sent))  # blocks on the oldest request
    else:
        raise SimError(f"simulation did not finish within {max_rounds} rounds")
    tpot = tuple((finish[i] - first[i]) * 1e3 / (sc.output_tokens[i] - 1)
                 for i in range(num) if sc.output_tokens[i] > 1)
    return EngineSimResult(duration_s=attn_s, num_steps=num_steps, num_output_tokens=num_out,
                           num_preemptions=sum(ln.scheduler.num_preemptions for ln in lanes),
                           ttft_ms=tuple(f * 1e3 for f in first), tpot_ms=tpot)
