"""Fit a chip's efficiency constants to measured engine steps.

The cost model has a handful of constants per chip (fractions of peak matrix rate, memory
bandwidth and attention rate, a fixed cost per step and a host cost per sequence). Calibration
picks the values that best explain measured steps, by coordinate search on a log scale over the
mean squared log error: plain, dependency-free, and a few hundred cost evaluations is enough for
five constants. The fitted constants then predict workloads they were not fitted on.

A sample that carries a machine gauge reading is costed at the speed the machine had during its
run (:func:`tessera.sim.gauge.system_at`), so the constants are fractions of the profile's
rates at its reference reading, not of whatever state the machine was in when each run ran.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .engine_probe import StepSample
from .engine_sim import StepCost
from .gauge import system_at
from .hardware import Efficiency, System
from .model import ModelSpec

FITTED = ("matmul", "memory", "kv_memory", "kv_memory_split", "attention", "overlap",
          "op_overhead_us", "step_overhead_ms", "seq_overhead_us", "attention_row_us")
_FLOOR = {"op_overhead_us": 1e-2, "step_overhead_ms": 1e-3, "seq_overhead_us": 1e-2,
          "attention_row_us": 1e-3}
# Efficiencies are fractions of a rate measured on this machine. The raw rates come from a
# fraction of a second of timing and may catch a busy moment (the fit's hundreds of steps are
# the better estimate), so up to 3 is accepted; beyond that the constant would be standing in
# for something the model lacks. ``overlap`` is a share (at most 1: the pure roofline max).
_CAP = {"matmul": 3.0, "attention": 3.0, "memory": 3.0, "kv_memory": 3.0, "kv_memory_split": 3.0,
        "overlap": 1.0}


def profile_with(profile: dict[str, Any], eff: Efficiency) -> dict[str, Any]:
    """A calibration profile whose efficiency block carries ``eff``'s fitted constants."""
    return {**profile, "efficiency": {**profile["efficiency"],
                                      **{k: getattr(eff, k) for k in FITTED}}}


def _with(system: System, eff: Efficiency) -> System:
    return replace(system, chip=replace(system.chip, efficiency=eff))


def _predicted_s(system: System, model: ModelSpec, precision: str,
                 samples: Sequence[StepSample]) -> list[float]:
    """Predicted seconds of each sample, each costed at its own gauge reading."""
    costs: dict[tuple[float, float] | None, StepCost] = {}
    out = []
    for s in samples:
        if s.gauge not in costs:
            costs[s.gauge] = StepCost(system_at(system, s.gauge), model, precision)
        out.append(costs[s.gauge].seconds(s.load))
    return out


def step_errors(system: System, model: ModelSpec, precision: str,
                samples: Sequence[StepSample]) -> list[float]:
    """Relative error (predicted / measured - 1) of each sample under ``system``'s constants."""
    return [p / s.seconds - 1.0
            for p, s in zip(_predicted_s(system, model, precision, samples), samples, strict=True)]


def _loss(system: System, model: ModelSpec, precision: str,
          samples: Sequence[StepSample]) -> float:
    predicted = _predicted_s(system, model, precision, samples)
    return sum(math.log(p / s.seconds) ** 2
               for p, s in zip(predicted, samples, strict=True)) / len(samples)


def fit_efficiency(system: System, model: ModelSpec, precision: str,
                   samples: Sequence[StepSample], rounds: int = 12) -> Efficiency:
    """Efficiency constants of ``system``'s chip that best predict ``samples``."""
    if len(samples) < len(FITTED):
        raise ValueError(f"need at least {len(FITTED)} step samples, got {len(samples)}")
    eff = system.chip.efficiency
    if eff.kv_memory is None:
        eff = replace(eff, kv_memory=eff.memory)  # start from the shared rate
    if eff.kv_memory_split is None:
        eff = replace(eff, kv_memory_split=eff.kv_memory)
    eff = replace(eff, **{k: max(getattr(eff, k), _FLOOR.get(k, 1e-3)) for k in FITTED})
    best = _loss(_with(system, eff), model, precision, samples)
    step = 2.0
    for _ in range(rounds):
        for name in FITTED:
            for factor in (step, 1.0 / step):
                while True:
                    value = getattr(eff, name) * factor
                    if not _FLOOR.get(name, 1e-3) <= value <= _CAP.get(name, math.inf):
                        break
                    trial = replace(eff, **{name: value})
                    loss = _loss(_with(system, trial), model, precision, samples)
                    if loss >= best:
                        break
                    eff, best = trial, loss
        step = math.sqrt(step)
    return eff
