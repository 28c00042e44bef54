"""Several Tessera instances on this machine, simulated: data-parallel instances behind the
router, or prefill instances handing over to decode instances (``tessera.cluster``).

Each instance is one engine on the engine scheduler's virtual clock
(:func:`tessera.sim.engine_sim.simulate_engine`) on one device of the calibrated local system
(``threads_per_device`` engine threads). Placement is what the router does for prompts that
share nothing: requests go to the instances in turn, in arrival order. With prefill and decode
instances, a request's prompt and first token run on a prefill instance; at its first token it
arrives at a decode instance, which loads the prompt's full blocks from the host KV tier and
computes the rest (as the runtime's handoff does), then decodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .engine_sim import EngineScenario, simulate_engine
from .errors import SimError


@dataclass(frozen=True)
class Requests:
    """Requests by index: prompt and output lengths, arrival times (seconds)."""

    prompt_tokens: tuple[int, ...]
    output_tokens: tuple[int, ...]
    arrival_s: tuple[float, ...]


@dataclass(frozen=True)
class ClusterTimes:
    """Per request: time to first token and mean time per output token after it (ms; NaN
    where a request has one output token), and the time the last request finished."""

    ttft_ms: tuple[float, ...]
    tpot_ms: tuple[float, ...]
    end_s: float
    num_steps: int
    """Steps of all instances."""

    @property
    def num_requests(self) -> int:
        return len(self.ttft_ms)


def _pool(engine: EngineScenario, reqs: Requests, order: list[int], num_instances: int,
          prompts_in_host_tier: bool = False) -> tuple[dict[int, float], dict[int, float], int]:
    """Requests ``order`` placed in turn on ``num_instances`` engines like ``engine``: each
    one's first-token and finish times by request index, and the steps of all engines."""
    first: dict[int, float] = {}
    finish: dict[int, float] = {}
    num_steps = 0
    for which in (order[k::num_instances] for k in range(num_instances)):
        if not which:
            continue
        res = simulate_engine(replace(
            engine, prompt_tokens=tuple(reqs.prompt_tokens[i] for i in which),
            output_tokens=tuple(reqs.output_tokens[i] for i in which),
            arrival_s=tuple(reqs.arrival_s[i] for i in which), concurrency=None,
            prompts_in_host_tier=prompts_in_host_tier))
        num_steps += res.num_steps
        for k, i in enumerate(which):
            first[i], finish[i] = res.first_s[k], res.finish_s[k]
    return first, finish, num_steps


def _times(reqs: Requests, first: dict[int, float], finish: dict[int, float],
           num_steps: int) -> ClusterTimes:
    n = len(reqs.arrival_s)
    tpot = [(finish[i] - first[i]) * 1e3 / (reqs.output_tokens[i] - 1)
            if reqs.output_tokens[i] > 1 else math.nan for i in range(n)]
    return ClusterTimes(ttft_ms=tuple((first[i] - reqs.arrival_s[i]) * 1e3 for i in range(n)),
                        tpot_ms=tuple(tpot), end_s=max(finish.values(), default=0.0),
                        num_steps=num_steps)


def _arrival_order(reqs: Requests) -> list[int]:
    return sorted(range(len(reqs.arrival_s)), key=lambda i: reqs.arrival_s[i])


def simulate_data_parallel(engine: EngineScenario, reqs: Requests,
                           num_instances: int) -> ClusterTimes:
    """``num_instances`` engines like ``engine`` (its requests are replaced by ``reqs``'s)."""
    if num_instances < 1:
        raise SimError("a cluster needs at least one instance")
    return _times(reqs, *_pool(engine, reqs, _arrival_order(reqs), num_instances))


def simulate_prefill_decode(engine: EngineScenario, reqs: Requests, num_prefill: int,
                            num_decode: int) -> ClusterTimes:
    """``num_prefill`` prefill and ``num_decode`` decode instances like ``engine``."""
    if num_prefill < 1 or num_decode < 1:
        raise SimError("prefill/decode needs at least one instance of each")
    n = len(reqs.arrival_s)
    # The prefill side computes each prompt and its first token.
    prefill = Requests(reqs.prompt_tokens, (1,) * n, reqs.arrival_s)
    first, finish, num_steps = _pool(engine, prefill, _arrival_order(reqs), num_prefill)
    # What is left goes on at a decode instance from the first token: prompt plus that token.
    handed = Requests(tuple(p + 1 for p in reqs.prompt_tokens),
                      tuple(o - 1 for o in reqs.output_tokens),
                      tuple(first[i] for i in range(n)))
    rest = sorted((i for i in range(n) if reqs.output_tokens[i] > 1), key=lambda i: first[i])
    _, decoded, decode_steps = _pool(engine, handed, rest, num_decode,
                                     prompts_in_host_tier=True)
    return _times(reqs, first, finish | decoded, num_steps + decode_steps)
