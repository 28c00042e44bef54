"""Calibration rounds interleaved with a benchmark's own runs, each run stamped with the
machine gauge reading around it."""

import pytest

from benchmarks.simlab import rounds
from benchmarks.simlab.gauge import GaugeLog
from benchmarks.simlab.rounds import calibration_round, gauged_rounds
from tessera.sim.engine_probe import CALIBRATION_RUNS, StepSample
from tessera.sim.engine_sim import StepLoad


class FakeGauge:
    """Hands out scripted readings, one per read."""

    def __init__(self, readings: list[tuple[float, float]]) -> None:
        self._readings = list(readings)

    def read(self) -> tuple[float, float]:
        return self._readings.pop(0)


def test_a_calibration_round_interleaves_other_work_in_a_shuffled_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def fake_run(engine, model, kv_bytes, index, seed):  # type: ignore[no-untyped-def]
        calls.append(index)
        return [StepSample(StepLoad(1, 1, 1, 0.0, 0.0), float(index + seed))]

    monkeypatch.setattr(rounds, "calibration_run", fake_run)
    num_cal = len(CALIBRATION_RUNS)
    others = [lambda tag=tag: calls.append(tag) for tag in ("a", "b")]
    runs = calibration_round(None, None, 4.0, seed=100, interleave=others,  # type: ignore[arg-type]
                             order_seed=3)
    # Every workload ran once and the runs come back in CALIBRATION_RUNS order, whatever order
    # they ran in; the interleaved work ran once each, among them.
    assert [run[0].seconds for run in runs] == [100.0 + k for k in range(num_cal)]
    assert sorted(calls, key=str) == sorted([*range(num_cal), "a", "b"], key=str)
    shuffled = list(calls)
    assert shuffled != [*range(num_cal), "a", "b"]
    calls.clear()
    calibration_round(None, None, 4.0, seed=100, interleave=others,  # type: ignore[arg-type]
                      order_seed=3)
    assert calls == shuffled  # the same seed, the same order
    calls.clear()
    calibration_round(None, None, 4.0, seed=100, interleave=others)  # type: ignore[arg-type]
    assert calls == [*range(num_cal), "a", "b"]  # no seed: the workloads, then the others
    # before_each runs just before each task, told which: a gauge read next to every run.
    calls.clear()
    calibration_round(None, None, 4.0, seed=100, interleave=others,  # type: ignore[arg-type]
                      order_seed=3, before_each=lambda task: calls.append(("gauge", task)))
    ids = [num_cal + "ab".index(t) if isinstance(t, str) else t for t in shuffled]
    assert calls == [x for task, tag in zip(ids, shuffled, strict=True)
                     for x in (("gauge", task), tag)]


def test_gauged_rounds_stamp_each_run_with_its_own_reading() -> None:
    log = GaugeLog(FakeGauge([(1.0, 10.0), (1.0, 20.0), (1.0, 30.0), (1.0, 40.0), (1.0, 50.0)]))
    load = StepLoad(num_seqs=1, num_tokens=1, num_sampled=1, attention_flops=1.0, kv_bytes=1.0)
    # Two rounds of two workloads; round 0 ran workload 1 first (a shuffled order).
    for key in [(0, 1), (0, 0), (1, 0), (1, 1)]:
        log.mark(key)
    log.close()
    rounds_ = [[[StepSample(load, 1.0)], [StepSample(load, 2.0)]],
               [[StepSample(load, 3.0)], [StepSample(load, 4.0)]]]
    stamped = gauged_rounds(rounds_, log)
    assert [[run[0].gauge for run in rnd] for rnd in stamped] == [
        [(1.0, 25.0), (1.0, 15.0)], [(1.0, 35.0), (1.0, 45.0)]]
    assert [[run[0].seconds for run in rnd] for rnd in stamped] == [[1.0, 2.0], [3.0, 4.0]]
