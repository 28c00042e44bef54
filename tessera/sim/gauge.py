"""A ~50 ms reading of this machine's speed, taken around every measured run of a local check.

On a shared machine the speed drifts while a calibration runs: on the benchmark AMD EPYC the
weight-streaming rate flips between two states (about 36 and 59 GB/s) every minute or so, and a
batch-1 decode step follows it (15 against 11 ms), while prefill, the matrix rate and decode
steps of 8 sequences hold still. A profile's raw rates are one moment's (``measure`` keeps the
reading of that moment); :class:`GaugeLog` keeps the readings around each run, and
:func:`system_at` rates a system at one of them. The local checks report the errors of a fit
and simulation rated that way next to their plain result: the correction helps steps that
stream weights and hurts steps the cost model wrongly makes follow the memory state, and over
five runs it did not beat the plain fit (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import replace
from statistics import median
from typing import Any, Protocol

from .hardware import System

GaugeReading = tuple[float, float]
"""(fp32 GFLOP/s of a 512-square engine linear, weight-streaming GB/s)."""


def best_s(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``fn`` (others on the machine only slow it)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def engine_linear(x: Any, weight: Any) -> Callable[[], object]:
    """x [n, K] times weight [N, K]^T as the engine's linears run it: through the packed path
    (weight panels or oneDNN's layout, ``kernels/linear.py``) where a float32 weight is packed,
    else a plain matmul. Why: the rates are what the fitted efficiencies are fractions of, and
    the engine's packed float32 path ran at about twice MKL's rate on the benchmark AMD EPYC."""
    import torch

    from tessera.model.kernels.linear import can_pack, pack_weight, packed_linear

    if can_pack(weight):
        packed = pack_weight(weight)
        return lambda: packed_linear(x, weight, packed, 1)
    return lambda: torch.mm(x, weight.t())


class MachineGauge:
    """Reads this machine's speed in ~50 ms: a 512-square engine linear (fp32 GFLOP/s) and a
    one-row matmul over a 256 MiB weight (weight-streaming GB/s; far larger than a desktop or
    small-server last-level cache, though not than the largest ones). The same operations as
    :func:`tessera.sim.calibrate.measure`, smaller."""

    def __init__(self) -> None:
        import torch

        size = 512
        self._mm = engine_linear(torch.randn(size, size), torch.randn(size, size))
        self._flops = 2.0 * size**3
        weight = torch.ones(2048, 32768, dtype=torch.float32)  # 256 MiB
        self._stream = engine_linear(torch.ones(1, 32768), weight)
        self._bytes = weight.numel() * 4

    def read(self) -> GaugeReading:
        """(fp32 GFLOP/s, weight-streaming GB/s), each the best of a few tries."""
        return (self._flops / best_s(self._mm, 5) / 1e9,
                self._bytes / best_s(self._stream, 3) / 1e9)


class Gauge(Protocol):
    """Anything that reads the machine's speed (:class:`MachineGauge`, or a scripted one)."""

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


def system_at(system: System, reading: GaugeReading | None) -> System:
    """``system`` with its chip's rates at the machine speed ``reading`` gives: its matrix rates
    scaled by the reading's GFLOP/s and its weight-streaming rate by the reading's GB/s, each
    against the chip's reference reading (``Chip.gauge``). KV read rates are left as they are:
    Tessera's CPU attention kernel reads KV at its own pace (23-38 GB/s, well below a weight
    stream), and 8-sequence decode steps reading ~180 MB of KV took the same time in both
    memory states (benchmarks/RESULTS.md). Unchanged where either reading is missing (every
    catalog chip)."""
    ref = system.chip.gauge
    if reading is None or ref is None:
        return system
    flops, stream = reading[0] / ref[0], reading[1] / ref[1]
    eff = system.chip.efficiency
    kv = eff.memory if eff.kv_memory is None else eff.kv_memory
    split = kv if eff.kv_memory_split is None else eff.kv_memory_split
    # KV rates are fractions of the memory rate: divide them by the stream's factor so that
    # their bytes per second stay where they were.
    chip = replace(system.chip, tflops={k: v * flops for k, v in system.chip.tflops.items()},
                   memory_bytes_per_s=system.chip.memory_bytes_per_s * stream, gauge=reading,
                   efficiency=replace(eff, kv_memory=kv / stream, kv_memory_split=split / stream))
    return replace(system, chip=chip)


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
