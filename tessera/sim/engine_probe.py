"""Measure Tessera's engine step by step: (step load, seconds) samples for calibration.

The engine runs unmodified: a step observer (``LLMEngine.add_step_observer``) reads each
scheduled batch's load before the model runs it, and prefix-cache hits come from
``engine.stats()``. The samples feed :func:`tessera.sim.fit.fit_system`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tessera.engine.scheduler import SchedulerOutput
from tessera.sampling_params import SamplingParams

from .engine_sim import StepLoad, step_load
from .errors import SimError
from .model import ModelCosts

if TYPE_CHECKING:
    from tessera.engine.llm_engine import LLMEngine


@dataclass(frozen=True)
class StepSample:
    """One measured engine step."""

    load: StepLoad
    seconds: float
    gauge: tuple[float, float] | None = None
    """The machine speed reading around the run this step belongs to (``Chip.gauge``); None:
    the machine at the profile's own reading."""


@dataclass(frozen=True)
class ProbeRun:
    """A measured run: every step, and per-request latencies as a client would see them."""

    samples: list[StepSample]
    wall_s: float
    num_output_tokens: int
    ttft_ms: list[float]
    tpot_ms: list[float]
    """Per request with more than one output token: (finish - first token) / (outputs - 1)."""
    num_prefix_hit_tokens: int = 0
    """Prompt tokens the engine took from its prefix cache instead of computing them."""

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s


def record_steps(engine: LLMEngine, model: ModelCosts, prompts: list[list[int]],
                 output_tokens: list[int], kv_bytes_per_element: float,
                 max_in_flight: int | None = None) -> ProbeRun:
    """Run ``prompts`` (greedy, ignoring EOS) through ``engine`` and time every step.

    All arrive at once, or with ``max_in_flight`` as a closed-loop client sends them: that many
    at first, then the next one as soon as a step finishes one (``EngineScenario.concurrency``
    in the simulation). TTFT counts from each request's arrival. ``engine`` has no requests in
    flight.
    """
    if len(prompts) != len(output_tokens):
        raise ValueError("one output length per prompt")
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
    scheduled: list[StepLoad] = []  # the load of the step running now, once it is scheduled

    def observe(out: SchedulerOutput) -> None:
        scheduled.append(step_load(model, out, kv_bytes_per_element))

    samples: list[StepSample] = []
    first: dict[str, float] = {}
    finish: dict[str, float] = {}
    counts: dict[str, int] = {}
    tag = time.monotonic_ns()
    arrived: dict[str, float] = {}
    num_sent = 0

    def send(now: float) -> None:
        nonlocal num_sent
        rid = f"probe-{tag}-{num_sent}"
        params = SamplingParams(max_tokens=output_tokens[num_sent], temperature=0.0,
                                ignore_eos=True)
        engine.add_request(rid, prompts[num_sent], params)
        arrived[rid] = now
        num_sent += 1

    hits_before = engine.stats().num_prefix_hit_tokens_total
    engine.add_step_observer(observe)
    try:
        start = time.perf_counter()
        while num_sent < min(len(prompts), max_in_flight or len(prompts)):
            send(start)
        while engine.has_unfinished_requests():
            scheduled.clear()
            t0 = time.perf_counter()
            step = engine.step_with_deltas()
            now = time.perf_counter()
            if scheduled:  # an empty schedule runs nothing and is no step
                samples.append(StepSample(scheduled[0], now - t0))
            for delta in step.deltas:
                rid = delta.request_id
                first.setdefault(rid, now)
                counts[rid] = counts.get(rid, 0) + 1
                if delta.finish_reason is not None:
                    finish[rid] = now
                    if num_sent < len(prompts):
                        send(now)
        wall_s = time.perf_counter() - start
    finally:
        engine.remove_step_observer(observe)
    ttft = [(first[r] - arrived[r]) * 1e3 for r in sorted(first)]
    tpot = [(finish[r] - first[r]) * 1e3 / (counts[r] - 1) for r in sorted(finish) if counts[r] > 1]
    return ProbeRun(samples, wall_s, sum(counts.values()), ttft, tpot,
                    engine.stats().num_prefix_hit_tokens_total - hits_before)


def fresh_run(run: ProbeRun) -> ProbeRun:
    """``run``, checked to have computed every prompt token: the simulator gives a workload
    distinct prompts, so a measured run whose prompts began like an earlier run's (and took
    that run's blocks from the prefix cache) would be compared against different work. Raises
    :class:`SimError`, so ``tessera sim calibrate`` reports it in one line."""
    if run.num_prefix_hit_tokens:
        raise SimError(f"a measured run took {run.num_prefix_hit_tokens} prompt tokens from "
                       "the prefix cache: its prompts share a prefix with an earlier run's")
    return run


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``num`` random prompts of ``length`` ids (distinct, so no prefix-cache hits)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(num)]


# (requests, prompt tokens, output tokens), all arriving at once. The set spans the regimes a
# CPU engine step goes through: decode at batch 1 (weight streaming, short and long context) and
# at batches 3 to 64 (the matmuls turn compute bound, KV reads grow), single and batched prefills
# up to 1500 tokens (matmul rate, causal attention), a 3000-token prompt split in chunks that
# attend over their cached context, and prefill chunks mixed with running decodes. KV-heavy
# decodes come both below and at the batch from which the decode kernel reads whole sequences
# (6 and 16 sequences of 512-600 tokens; ``HostCosts.kv_whole_batch``), so that both KV rates
# are fitted on reads of the same size.
CALIBRATION_RUNS: tuple[tuple[int, int, int], ...] = (
    (1, 32, 40), (1, 600, 48), (3, 200, 64), (4, 64, 40), (16, 64, 32), (32, 96, 24),
    (64, 32, 48), (2, 1024, 2), (8, 256, 2), (1, 1500, 2), (2, 3000, 2), (6, 600, 16),
    (16, 512, 16),
)


def calibration_run(engine: LLMEngine, model: ModelCosts, kv_bytes_per_element: float,
                    index: int, seed: int) -> list[StepSample]:
    """One run of calibration workload ``index`` (of ``CALIBRATION_RUNS``): its step samples.
    Random prompts from ``seed + index``; a run that hit the prefix cache raises."""
    num, prompt_len, out_len = CALIBRATION_RUNS[index]
    prompts = random_prompts(num, prompt_len, engine.runtime.vocab_size, seed + index)
    return fresh_run(record_steps(engine, model, prompts, [out_len] * num,
                                  kv_bytes_per_element)).samples


def fastest_runs(rounds: Sequence[Sequence[list[StepSample]]]) -> list[StepSample]:
    """Per workload, the steps of its fastest run over ``rounds`` (each round holds one run of
    every workload, in the same order), concatenated.

    Other processes on the machine only ever slow a run down, so the fastest run is the
    closest to the engine's own cost. The whole run is kept, not each step's minimum over the
    runs: that minimum picks every step's luckiest timing and would fit constants faster than
    any one run ever is.
    """
    samples: list[StepSample] = []
    for k, r in enumerate(fastest_rounds(rounds)):
        samples += rounds[r][k]
    return samples


def fastest_rounds(rounds: Sequence[Sequence[list[StepSample]]]) -> list[int]:
    """Per workload, the round of its fastest run (the run :func:`fastest_runs` keeps)."""
    return [min(range(len(rounds)), key=lambda r: sum(s.seconds for s in rounds[r][k]))
            for k in range(len(rounds[0]))]


def calibration_samples(engine: LLMEngine, model: ModelCosts, kv_bytes_per_element: float,
                        seed: int = 0, repeats: int = 2) -> list[StepSample]:
    """Run the calibration workloads ``repeats`` times on ``engine`` (fresh prompts each
    round: the same schedule, no prefix-cache hits) and return the steps of each workload's
    fastest run (:func:`fastest_runs`)."""
    return fastest_runs([
        [calibration_run(engine, model, kv_bytes_per_element, k, seed + 1000 * r)
         for k in range(len(CALIBRATION_RUNS))]
        for r in range(max(repeats, 1))])


def with_engine_facts(profile: dict[str, Any], engine: LLMEngine) -> dict[str, Any]:
    """``profile`` with its ``host`` block naming what ``engine``'s CPU kernels do by batch
    size: the decode steps that run all layers as one native call
    (``HostCosts.native_decode_rows``; the engine's decode stack, built by a warm-up step) and
    the decode batch from which the attention kernel reads whole sequences
    (``HostCosts.kv_whole_batch``; 0 without the C++ kernels). The engine runs on the CPU."""
    import torch

    from tessera.model.kernels.build import kernel_available
    from tessera.model.kernels.paged_decode import whole_sequence_batch

    if engine.config.device != "cpu":
        raise SimError(f"the engine facts of a CPU profile need a CPU engine, not device "
                       f"{engine.config.device!r}")
    # The runner is one of LLMEngine's public parts; the engine contract (Engine) names no
    # such kernel fact, and only an in-process CPU engine has one.
    whole = whole_sequence_batch(torch.get_num_threads()) if kernel_available() else 0
    return {**profile, "host": {**profile.get("host", {}),
                                "native_decode_rows": engine.native_decode_rows,
                                "kv_whole_batch": whole}}
