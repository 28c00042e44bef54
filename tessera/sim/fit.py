"""Fit a local system's constants to measured engine steps.

The cost model has a handful of constants per system: the chip's fractions of peak matrix rate,
memory bandwidth and attention rate and its fixed costs (:class:`Efficiency`), and Tessera's
host costs per sequence and per prefill row (:class:`HostCosts`). Calibration picks the values
that best explain measured steps, by coordinate search on a log scale over the mean squared log
error: plain, dependency-free, and a few hundred cost evaluations is enough for ten constants.

A sample that carries a machine speed reading is costed at the speed the machine had during its
run (:func:`tessera.sim.hardware.system_at`), so the constants are fractions of the profile's
rates at its reference reading, not of whatever state the machine was in when each run ran.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .engine_probe import StepSample
from .engine_sim import StepCost
from .hardware import HOST_FIELDS, System, system_at
from .model import ModelCosts

FITTED = ("matmul", "memory", "kv_memory", "kv_memory_split", "attention", "overlap",
          "op_overhead_us", "step_overhead_ms", "seq_overhead_us", "attention_row_us")
"""The fitted constants, in the order the search visits them; those in ``HOST_FIELDS`` are
host costs, the others the chip's efficiency."""
_FLOOR = {"op_overhead_us": 1e-2, "step_overhead_ms": 1e-3, "seq_overhead_us": 1e-2,
          "attention_row_us": 1e-3}
# Efficiencies are fractions of a rate measured on this machine. The raw rates come from a
# fraction of a second of timing and may catch a busy moment (the fit's hundreds of steps are
# the better estimate), so up to 3 is accepted; beyond that the constant would be standing in
# for something the model lacks. ``overlap`` is a share (at most 1: the pure roofline max).
_CAP = {"matmul": 3.0, "attention": 3.0, "memory": 3.0, "kv_memory": 3.0, "kv_memory_split": 3.0,
        "overlap": 1.0}


def _get(system: System, name: str) -> Any:
    return getattr(system.host if name in HOST_FIELDS else system.chip.efficiency, name)


def _set(system: System, **values: Any) -> System:
    """``system`` with the named constants (efficiency or host) set to ``values``."""
    host = {k: v for k, v in values.items() if k in HOST_FIELDS}
    eff = {k: v for k, v in values.items() if k not in HOST_FIELDS}
    return replace(system, host=replace(system.host, **host),
                   chip=replace(system.chip, efficiency=replace(system.chip.efficiency, **eff)))


def profile_with(profile: dict[str, Any], system: System) -> dict[str, Any]:
    """A calibration profile whose ``efficiency`` and ``host`` blocks carry ``system``'s
    fitted constants."""
    eff = {k: _get(system, k) for k in FITTED if k not in HOST_FIELDS}
    host = {k: _get(system, k) for k in FITTED if k in HOST_FIELDS}
    return {**profile, "efficiency": {**profile["efficiency"], **eff},
            "host": {**profile.get("host", {}), **host}}


def _predicted_s(system: System, model: ModelCosts, precision: str,
                 samples: Sequence[StepSample]) -> list[float]:
    """Predicted seconds of each sample, each costed at its own gauge reading."""
    costs: dict[tuple[float, float] | None, StepCost] = {}
    out = []
    for s in samples:
        if s.gauge not in costs:
            costs[s.gauge] = StepCost(system_at(system, s.gauge), model, precision)
        out.append(costs[s.gauge].seconds(s.load))
    return out


def step_errors(system: System, model: ModelCosts, precision: str,
                samples: Sequence[StepSample]) -> list[float]:
    """Relative error (predicted / measured - 1) of each sample under ``system``'s constants."""
    return [p / s.seconds - 1.0
            for p, s in zip(_predicted_s(system, model, precision, samples), samples, strict=True)]


def _loss(system: System, model: ModelCosts, precision: str,
          samples: Sequence[StepSample]) -> float:
    predicted = _predicted_s(system, model, precision, samples)
    return sum(math.log(p / s.seconds) ** 2
               for p, s in zip(predicted, samples, strict=True)) / len(samples)


def fit_system(system: System, model: ModelCosts, precision: str,
               samples: Sequence[StepSample], rounds: int = 12) -> System:
    """``system`` with the constants (``FITTED``) that best predict ``samples``."""
    if len(samples) < len(FITTED):
        raise ValueError(f"need at least {len(FITTED)} step samples, got {len(samples)}")
    if _get(system, "kv_memory") is None:
        system = _set(system, kv_memory=_get(system, "memory"))  # start from the shared rate
    if _get(system, "kv_memory_split") is None:
        system = _set(system, kv_memory_split=_get(system, "kv_memory"))
    system = _set(system, **{k: max(_get(system, k), _FLOOR.get(k, 1e-3)) for k in FITTED})
    best = _loss(system, model, precision, samples)
    step = 2.0
    for _ in range(rounds):
        for name in FITTED:
            for factor in (step, 1.0 / step):
                while True:
                    value = _get(system, name) * factor
                    if not _FLOOR.get(name, 1e-3) <= value <= _CAP.get(name, math.inf):
                        break
                    trial = _set(system, **{name: value})
                    loss = _loss(trial, model, precision, samples)
                    if loss >= best:
                        break
                    system, best = trial, loss
        step = math.sqrt(step)
    return system
