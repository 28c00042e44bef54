"""Tessera's own engine on a virtual clock: the real scheduler and block manager, modelled steps.

The fleet simulator (:mod:`tessera.sim.simulator`) batches with vectorised slots so that 384
devices and 100k requests stay fast. To predict one Tessera engine, this module instead runs
``tessera.engine``'s :class:`Scheduler` and :class:`BlockManager` unchanged (they import no
torch), so chunked prefill, the token budget, prefix caching and preemption behave exactly as
in a real run. Only the model is replaced: each step's duration comes from the same roofline
:class:`PoolCost` as every other scenario, applied to the load that the scheduler's output
implies, plus a per-sequence host cost (Python bookkeeping, which grows with the batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from tessera.config import CacheConfig, SchedulerConfig
from tessera.engine.block_manager import BlockManager
from tessera.engine.scheduler import Scheduler, SchedulerOutput
from tessera.engine.sequence import Sequence
from tessera.sampling_params import SamplingParams

from .costmodel import PassLoad, PoolCost, PoolLayout, PrefillAttention, causal_pairs
from .errors import SimError
from .hardware import System
from .model import ModelCosts

_SCHEDULER = SchedulerConfig()
_CACHE = CacheConfig()
"""The engine's defaults, which a simulated engine's limits default to."""


@dataclass(frozen=True)
class StepLoad:
    """The work of one engine step, as plain numbers (what a step costs depends on these).

    ``attention_flops`` and ``kv_bytes`` are totals over all layers of the step; the
    ``prefill_*`` fields are the prefill chunks' part of them (the engine runs the decodes'
    attention in one paged kernel and each chunk's in SDPA of its own)."""

    num_seqs: int
    num_tokens: int
    num_sampled: int
    attention_flops: float
    kv_bytes: float
    num_prefill_chunks: int = 0
    """Sequences computing prompt tokens (a chunk each); the other ``num_seqs`` decode."""
    prefill_attention_flops: float = 0.0
    prefill_kv_bytes: float = 0.0

    @property
    def num_prefill_rows(self) -> int:
        """Prompt tokens computed: every token of the step that is not a decode."""
        return self.num_tokens - (self.num_seqs - self.num_prefill_chunks)

    def pass_load(self, num_layers: int) -> PassLoad:
        """The cost model's view of the step (one data-parallel group). A ``PassLoad`` holds
        the attention work of one layer (the pool cost charges it once per layer), so the
        step's totals are divided by ``num_layers``. A step without prefill chunks keeps the
        one-op view of its attention: it is all the decode kernel's."""
        def one(x: float) -> np.ndarray:
            return np.array([float(x)])

        prefill = None if not self.num_prefill_chunks else PrefillAttention(
            core_flops=one(self.prefill_attention_flops / num_layers),
            kv_bytes=one(self.prefill_kv_bytes / num_layers),
            num_rows=one(self.num_prefill_rows), num_chunks=one(self.num_prefill_chunks),
            num_decodes=one(self.num_seqs - self.num_prefill_chunks))
        return PassLoad(tokens=one(self.num_tokens), core_flops=one(self.attention_flops / num_layers),
                        kv_bytes=one(self.kv_bytes / num_layers), sampled=one(self.num_sampled),
                        prefill=prefill)


def step_load(model: ModelCosts, out: SchedulerOutput, kv_bytes_per_element: float) -> StepLoad:
    """Load of a scheduled step; call before the scheduler's ``update`` advances the sequences.

    A decode attends over its whole context; a prefill chunk attends causally over the cached
    context and itself, reading the cached part and writing its own KV (FLOPs as Tessera's
    attention path spends them, see below).
    """
    kv_bytes_per_token = model.kv_elements_per_token * kv_bytes_per_element * model.num_layers
    flops = kv = pre_flops = pre_kv = 0.0
    sampled = chunks = 0
    for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
        start = seq.num_computed_tokens
        if start + n == seq.num_tokens:
            sampled += 1
        if n == 1:  # the runner sends every one-token query to the paged decode kernel
            flops += model.attn_flops_per_kv_decode * (start + n) * model.num_layers
            kv += kv_bytes_per_token * (start + n)
            continue
        if start:
            # A chunk after cached context goes to SDPA with an explicit causal mask, and a
            # masked kernel computes every (query, key) score: n x (start + n), not a triangle.
            f = float(model.attn_flops_per_pair_prefill * n * (start + n) * model.num_layers)
        else:
            f = model.attn_flops_per_pair_prefill * causal_pairs(n, 0) * model.num_layers
        chunks += 1
        pre_flops += f
        pre_kv += kv_bytes_per_token * (start + n)
    return StepLoad(num_seqs=len(out.seqs), num_tokens=out.num_batched_tokens,
                    num_sampled=sampled, attention_flops=flops + pre_flops, kv_bytes=kv + pre_kv,
                    num_prefill_chunks=chunks, prefill_attention_flops=pre_flops,
                    prefill_kv_bytes=pre_kv)


class StepCost:
    """Seconds per engine step: the pool roofline plus per-sequence host work."""

    def __init__(self, system: System, model: ModelCosts, precision: str) -> None:
        layout = PoolLayout(num_groups=1, tp=1, num_ep=1, ffn_split=False, num_micro_batches=1,
                            precision=precision)
        self.pool = PoolCost(system, model, layout)
        self.num_layers = model.num_layers
        self.native_rows = system.host.native_decode_rows
        self.seq_overhead_s = system.host.seq_overhead_us * 1e-6

    def seconds(self, load: StepLoad) -> float:
        """Predicted duration of a step with ``load``."""
        native = load.num_tokens == load.num_seqs <= self.native_rows  # decode-only, few rows
        return (self.pool.step_s(load.pass_load(self.num_layers), per_op_launch=not native)
                + load.num_seqs * self.seq_overhead_s)


@dataclass(frozen=True)
class EngineScenario:
    """One engine (one data-parallel group) serving a list of requests.

    ``arrival_s`` gives each request's arrival; None means all arrive at time 0 (an offline
    ``LLM.generate`` call) unless ``concurrency`` is set. ``num_blocks`` should be the engine's real pool size so that
    preemption happens where it would.
    """

    system: System
    model: ModelCosts
    precision: str
    prompt_tokens: tuple[int, ...]
    output_tokens: tuple[int, ...]
    num_blocks: int
    kv_bytes_per_element: float = 4.0
    block_size: int = _CACHE.block_size
    max_num_seqs: int = _SCHEDULER.max_num_seqs
    max_num_batched_tokens: int = _SCHEDULER.max_num_batched_tokens
    enable_chunked_prefill: bool = _SCHEDULER.enable_chunked_prefill
    enable_prefix_caching: bool = _CACHE.enable_prefix_caching
    arrival_s: tuple[float, ...] | None = None
    concurrency: int | None = None
    """Closed loop: at most this many requests in flight, the next arriving when one ends."""
    prompts_in_host_tier: bool = False
    """Every full block of a prompt but its last token's is in a host KV tier and loads at the
    memory rate before the step that admits it (a decode instance taking over from a prefill
    instance, :mod:`tessera.sim.local_cluster`)."""


@dataclass(frozen=True)
class EngineSimResult:
    """What a run of the engine would measure."""

    duration_s: float
    num_steps: int
    num_output_tokens: int
    num_preemptions: int
    ttft_ms: tuple[float, ...]
    tpot_ms: tuple[float, ...]
    """Per request with more than one output token: (finish - first token) / (outputs - 1)."""
    first_s: tuple[float, ...] = ()
    """Per request: when its first token came out (the clock starts at 0)."""
    finish_s: tuple[float, ...] = ()
    """Per request: when its last token came out."""

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def tpot_ms_mean(self) -> float:
        return float(np.mean(self.tpot_ms)) if self.tpot_ms else 0.0

    @property
    def ttft_ms_mean(self) -> float:
        return float(np.mean(self.ttft_ms)) if self.ttft_ms else 0.0


def make_sequences(prompt_tokens: tuple[int, ...],
                   output_tokens: tuple[int, ...]) -> list[Sequence]:
    """One sequence per request, its id the request's index. Token ids are distinct across
    requests: no accidental prefix-cache hits between them."""
    seqs, next_token = [], 0
    for i, (num_prompt, num_out) in enumerate(zip(prompt_tokens, output_tokens, strict=True)):
        ids = list(range(next_token, next_token + num_prompt))
        next_token += num_prompt
        seqs.append(Sequence(str(i), ids, SamplingParams(max_tokens=num_out)))
    return seqs


def end_step(sched: Scheduler, out: SchedulerOutput, now: float,
             output_tokens: tuple[int, ...], first: list[float], finish: list[float]) -> list[int]:
    """Advance ``sched`` past a step that ended at ``now``: every sequence whose prompt is done
    samples a token; record first-token and finish times by request index (the request id),
    finish requests at their output length. Returns the indices that got a token."""
    sampled: list[int | None] = [
        0 if s.num_computed_tokens + n == s.num_tokens else None
        for s, n in zip(out.seqs, out.num_new_tokens, strict=True)
    ]
    sched.update(out, sampled)
    got = []
    for seq, tok in zip(out.seqs, sampled, strict=True):
        if tok is None:
            continue
        i = int(seq.request_id)
        got.append(i)
        if seq.num_output_tokens == 1:
            first[i] = now
        if seq.num_output_tokens >= output_tokens[i]:
            finish[i] = now
            sched.finish(seq, "length")
    return got


def simulate_engine(sc: EngineScenario, max_steps: int = 10_000_000) -> EngineSimResult:
    """Run the scenario to completion on a virtual clock; every request finishes or we raise."""
    num = len(sc.prompt_tokens)
    if len(sc.output_tokens) != num or (sc.arrival_s is not None and len(sc.arrival_s) != num):
        raise SimError("prompt_tokens, output_tokens and arrival_s need one entry per request")
    if min(sc.output_tokens, default=1) < 1:
        raise SimError("every request needs at least one output token")
    longest = max((p + o for p, o in zip(sc.prompt_tokens, sc.output_tokens, strict=True)), default=0)
    if math.ceil(longest / sc.block_size) > sc.num_blocks:
        raise SimError(f"a request of {longest} tokens does not fit {sc.num_blocks} KV blocks")
    cost = StepCost(sc.system, sc.model, sc.precision)
    bm = BlockManager(sc.num_blocks, sc.block_size, sc.enable_prefix_caching)
    sched = Scheduler(SchedulerConfig(max_num_seqs=sc.max_num_seqs,
                                      max_num_batched_tokens=sc.max_num_batched_tokens,
                                      enable_chunked_prefill=sc.enable_chunked_prefill), bm,
                      connector=_HostTierHolds() if sc.prompts_in_host_tier else None)
    # A loaded block is a copy of its KV bytes from host memory: at the memory rate.
    load_s_per_block = (sc.block_size * sc.model.kv_elements_per_token * sc.model.num_layers
                        * sc.kv_bytes_per_element / sc.system.chip.memory_bytes_per_s)
    if sc.concurrency is not None and (sc.concurrency < 1 or sc.arrival_s is not None):
        raise SimError("concurrency must be at least 1 and excludes arrival_s")
    arrivals = list(sc.arrival_s or (0.0,) * num)
    if sc.concurrency is not None:
        arrivals[sc.concurrency:] = [math.inf] * max(num - sc.concurrency, 0)
    order = sorted(range(num), key=lambda i: arrivals[i])
    seqs = make_sequences(sc.prompt_tokens, sc.output_tokens)
    first = [math.nan] * num
    finish = [math.nan] * num
    now, num_steps, num_out, pending, num_finished = 0.0, 0, 0, 0, 0
    for _ in range(max_steps):
        while pending < num and arrivals[order[pending]] <= now:
            sched.add(seqs[order[pending]])
            pending += 1
        if not sched.has_unfinished():
            if pending == num:
                break
            now = arrivals[order[pending]]
            continue
        out = sched.schedule()
        if out.is_empty:
            raise SimError("the engine scheduler made no progress (KV pool too small?)")
        load = step_load(sc.model, out, sc.kv_bytes_per_element)
        now += cost.seconds(load) + load_s_per_block * sum(len(x.keys) for x in out.loads)
        num_steps += 1
        for i in end_step(sched, out, now, sc.output_tokens, first, finish):
            num_out += 1
            if finish[i] == now:
                if sc.concurrency is not None and num_finished + sc.concurrency < num:
                    arrivals[order[num_finished + sc.concurrency]] = now
                num_finished += 1
    else:
        raise SimError(f"engine simulation did not finish within {max_steps} steps")
    ttft = tuple((first[i] - arrivals[i]) * 1e3 for i in range(num))
    tpot = tuple((finish[i] - first[i]) * 1e3 / (sc.output_tokens[i] - 1)
                 for i in range(num) if sc.output_tokens[i] > 1)
    start = min(arrivals, default=0.0)
    return EngineSimResult(duration_s=now - start, num_steps=num_steps, num_output_tokens=num_out,
                           num_preemptions=sched.num_preemptions, ttft_ms=ttft, tpot_ms=tpot,
                           first_s=tuple(first), finish_s=tuple(finish))


class _HostTierHolds:
    """A KV connector's scheduler side for which every block is in the host tier."""

    def num_loadable_blocks(self, keys: Iterable[int]) -> int:
        return sum(1 for _ in keys)

    def commit_lookup(self, keys: list[int], num_loading_blocks: int) -> None:
        pass
