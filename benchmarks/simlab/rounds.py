"""Calibration rounds interleaved with a benchmark's own measured runs.

``tessera sim calibrate`` runs the calibration workloads back to back
(``tessera.sim.engine_probe.calibration_samples``). A local check instead mixes them with the
runs it predicts, in a shuffled order, so that calibration and measurement see the same machine:
on a shared machine a heavy run can leave the next ones slower for a while, and the speed
drifts over minutes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from tessera.sim.engine_probe import CALIBRATION_RUNS, StepSample, calibration_run
from tessera.sim.model import ModelCosts

from .gauge import GaugeLog, GaugeReading


def calibration_round(engine: Any, model: ModelCosts, kv_bytes_per_element: float,
                      seed: int = 0, interleave: Sequence[Callable[[], object]] = (),
                      order_seed: int | None = None,
                      before_each: Callable[[int], object] | None = None,
                      ) -> list[list[StepSample]]:
    """One run of every calibration workload on ``engine``: each run's step samples, in the
    order of ``CALIBRATION_RUNS``. Random prompts from ``seed`` (use a new seed per round: the
    same lengths, so the same schedule, but no prefix-cache hits).

    ``interleave``: other work run among the workloads. With ``order_seed`` everything runs in
    an order shuffled from it, so that no run always follows the same one.

    ``before_each(task)`` runs just before each task: ``task`` < ``len(CALIBRATION_RUNS)`` is
    that calibration workload, ``len(CALIBRATION_RUNS) + i`` is ``interleave[i]`` (a machine
    gauge read next to every run, for one)."""
    num_cal = len(CALIBRATION_RUNS)
    tasks = list(range(num_cal + len(interleave)))
    if order_seed is not None:
        random.Random(order_seed).shuffle(tasks)
    runs: dict[int, list[StepSample]] = {}
    for task in tasks:
        if before_each is not None:
            before_each(task)
        if task < num_cal:
            runs[task] = calibration_run(engine, model, kv_bytes_per_element, task, seed)
        else:
            interleave[task - num_cal]()
    return [runs[k] for k in range(num_cal)]


def gauged_rounds(rounds: Sequence[Sequence[list[StepSample]]],
                  log: GaugeLog) -> list[list[list[StepSample]]]:
    """``rounds`` of :func:`calibration_round` with every run's samples carrying the gauge
    reading around that run, ``log.around((round, workload))``: the log was marked with
    ``(round, task)`` before each task (``before_each``) and closed after the last round."""
    return [[with_gauge(run, log.around((r, k))) for k, run in enumerate(rnd)]
            for r, rnd in enumerate(rounds)]


def with_gauge(samples: list[StepSample], reading: GaugeReading) -> list[StepSample]:
    """``samples`` of one run, each carrying the gauge ``reading`` around that run."""
    return [replace(s, gauge=reading) for s in samples]
