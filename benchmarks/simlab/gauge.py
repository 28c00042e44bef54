"""Machine-speed readings around every measured run of a local check.

On a shared machine the speed drifts while a calibration runs (on the benchmark machine the
weight-streaming rate flips between two states every minute or so; benchmarks/RESULTS.md). A
profile's raw rates are one moment's (``calibrate.measure`` keeps the reading of that moment,
``Chip.gauge``); :class:`GaugeLog` keeps the readings around each run, so that a fit and a
simulation can cost each run at the machine speed it had (``tessera.sim.hardware.system_at``).
"""

from __future__ import annotations

from collections.abc import Hashable
from statistics import median
from typing import Any, Protocol

GaugeReading = tuple[float, float]
"""(fp32 GFLOP/s of a 512-square engine linear, weight-streaming GB/s)."""


class Gauge(Protocol):
    """Anything that reads the machine's speed (``tessera.sim.calibrate.MachineGauge``, or a
    scripted one)."""

    def read(self) -> GaugeReading: ...


class GaugeLog:
    """Gauge readings taken between runs, in the order they were taken.

    ``mark(key)`` reads the gauge just before the run named ``key``; :meth:`close` reads it once
    after the last run. A run's reading (:meth:`around`) is the mean of the one before it and the
    next one taken: the state can flip during a run of several seconds, and the mean of its two
    ends is nearer the run's average speed than either end alone.
    """

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self._keys: dict[Hashable, int] = {}
        self._readings: list[GaugeReading] = []

    def mark(self, key: Hashable) -> None:
        """Read the gauge now, as the reading before run ``key`` (each key once)."""
        if key in self._keys:
            raise ValueError(f"gauge already marked for run {key!r}")
        self._keys[key] = len(self._readings)
        self._readings.append(self._gauge.read())

    def close(self) -> None:
        """Read the gauge once after the last run."""
        self._readings.append(self._gauge.read())

    def around(self, key: Hashable) -> GaugeReading:
        """Mean of the readings just before and just after run ``key``."""
        i = self._keys[key]
        if i + 1 >= len(self._readings):
            raise ValueError(f"no reading after run {key!r} yet (call close after the last run)")
        (f0, b0), (f1, b1) = self._readings[i], self._readings[i + 1]
        return (f0 + f1) / 2.0, (b0 + b1) / 2.0

    def readings(self) -> list[GaugeReading]:
        """Every reading, in order."""
        return list(self._readings)


def gauge_report(kept_cal: list[GaugeReading], kept_val: list[GaugeReading],
                 every: list[GaugeReading]) -> dict[str, Any]:
    """Readings at the kept calibration and validation runs (medians), and their range over
    every run, with a line that says so: how far apart the machines of the two kinds of run
    were."""
    cal = [median([g[k] for g in kept_cal]) for k in (0, 1)]
    val = [median([g[k] for g in kept_val]) for k in (0, 1)]
    lo = [min(g[k] for g in every) for k in (0, 1)]
    hi = [max(g[k] for g in every) for k in (0, 1)]
    line = (f"machine gauge (median at the kept runs): calibration {cal[0]:.0f} GFLOP/s,"
            f" {cal[1]:.1f} GB/s; validation {val[0]:.0f} GFLOP/s, {val[1]:.1f} GB/s"
            f" ({val[0] / cal[0] - 1:+.0%}, {val[1] / cal[1] - 1:+.0%}); over all"
            f" {len(every)} readings {lo[0]:.0f}-{hi[0]:.0f} GFLOP/s, {lo[1]:.1f}-{hi[1]:.1f}"
            " GB/s")
    return dict(line=line, calibration=cal, validation=val, low=lo, high=hi)
