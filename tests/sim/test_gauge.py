"""The machine gauge: readings around runs, and a local system rated at a reading."""

from dataclasses import replace

import pytest

from tessera.sim.engine_probe import StepSample, gauged_rounds
from tessera.sim.engine_sim import StepCost, StepLoad
from tessera.sim.fit import fit_efficiency, step_errors
from tessera.sim.gauge import GaugeLog, gauge_report, system_at
from tessera.sim.hardware import get_system, system_from_profile
from tessera.sim.model import spec_from_config

CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=128, vocab_size=300)
REF = (200.0, 40.0)  # the gauge reading at which PROFILE's rates were measured
PROFILE = {
    "tflops": {"fp32": 0.1, "bf16": 1.0},
    "memory_gb": 16.0,
    "memory_gb_s": 10.0,
    "gauge": list(REF),
    "efficiency": {"matmul": 0.5, "attention": 0.2, "memory": 0.8, "fabric": 1.0,
                   "op_overhead_us": 2.0, "ops_per_layer": 14, "step_overhead_ms": 0.5,
                   "seq_overhead_us": 20.0, "overlap": 0.5},
}


class FakeGauge:
    """Hands out scripted readings, one per read."""

    def __init__(self, readings: list[tuple[float, float]]) -> None:
        self._readings = list(readings)

    def read(self) -> tuple[float, float]:
        return self._readings.pop(0)


def test_system_at_scales_each_rate_by_its_own_reading() -> None:
    system = system_from_profile(PROFILE)
    assert system.chip.gauge == REF
    fast = system_at(system, (300.0, 60.0))  # 1.5x the matrix rate, 1.5x the memory
    assert fast.chip.tflops["fp32"] == pytest.approx(0.15)
    assert fast.chip.tflops["bf16"] == pytest.approx(1.5)
    assert fast.chip.memory_bytes_per_s == pytest.approx(15e9)
    # KV reads keep their bytes per second: the CPU attention kernel sets that pace.
    for rated in (fast, system_at(system, (200.0, 20.0))):
        eff = rated.chip.efficiency
        assert rated.chip.memory_bytes_per_s * eff.kv_memory == pytest.approx(8e9)
        assert rated.chip.memory_bytes_per_s * eff.kv_memory_split == pytest.approx(8e9)
    slow_memory = system_at(system, (200.0, 20.0))  # memory only, halved
    assert slow_memory.chip.tflops == system.chip.tflops
    assert slow_memory.chip.memory_bytes_per_s == pytest.approx(5e9)
    # Rated twice: the second reading is against the first one, not the profile's.
    assert system_at(fast, REF).chip.memory_bytes_per_s == pytest.approx(10e9)
    assert system_at(system, None) is system
    catalog = get_system("dgx-h100")  # no reference reading: left as it is
    assert catalog.chip.gauge is None and system_at(catalog, (1.0, 1.0)) is catalog


def test_gauge_log_rates_a_run_by_the_readings_on_both_sides() -> None:
    log = GaugeLog(FakeGauge([(100.0, 30.0), (100.0, 50.0), (120.0, 50.0)]))
    log.mark("a")
    log.mark("b")
    with pytest.raises(ValueError, match="close"):
        log.around("b")  # nothing read after b yet
    log.close()
    assert log.around("a") == (100.0, 40.0)  # the state flipped during a
    assert log.around("b") == (110.0, 50.0)
    assert log.readings() == [(100.0, 30.0), (100.0, 50.0), (120.0, 50.0)]
    with pytest.raises(ValueError, match="already"):
        log.mark("a")


def test_gauged_rounds_stamp_each_run_with_its_own_reading() -> None:
    log = GaugeLog(FakeGauge([(1.0, 10.0), (1.0, 20.0), (1.0, 30.0), (1.0, 40.0), (1.0, 50.0)]))
    load = StepLoad(num_seqs=1, num_tokens=1, num_sampled=1, attention_flops=1.0, kv_bytes=1.0)
    # Two rounds of two workloads; round 0 ran workload 1 first (a shuffled order).
    for key in [(0, 1), (0, 0), (1, 0), (1, 1)]:
        log.mark(key)
    log.close()
    rounds = [[[StepSample(load, 1.0)], [StepSample(load, 2.0)]],
              [[StepSample(load, 3.0)], [StepSample(load, 4.0)]]]
    stamped = gauged_rounds(rounds, log)
    assert [[run[0].gauge for run in rnd] for rnd in stamped] == [
        [(1.0, 25.0), (1.0, 15.0)], [(1.0, 35.0), (1.0, 45.0)]]
    assert [[run[0].seconds for run in rnd] for rnd in stamped] == [[1.0, 2.0], [3.0, 4.0]]


def test_fit_with_readings_sees_through_a_machine_that_changed_speed() -> None:
    """Steps measured while the machine ran slower for a while (60% of its matrix rate, a third
    of its weight-streaming rate): costed at each run's reading, the fit recovers the constants
    that made them; blind to the readings, no set of constants explains both halves."""
    model = spec_from_config(CFG)
    truth = system_from_profile(PROFILE)
    loads = [StepLoad(num_seqs=s, num_tokens=t, num_sampled=s, attention_flops=f, kv_bytes=k)
             for s, t, f, k in [(1, 1, 1e5, 1e5), (8, 8, 1e6, 1e6), (32, 32, 1e7, 5e6),
                                (2, 1024, 1e9, 1e6), (4, 512, 3e8, 2e6), (64, 64, 4e7, 3e7),
                                (1, 2048, 4e9, 2e6), (16, 16, 2e6, 4e7), (3, 300, 1e8, 1e6)]]
    samples = []
    for reading in (REF, (REF[0] * 0.6, REF[1] / 3)):  # every workload once at each speed
        cost = StepCost(system_at(truth, reading), model, "fp32")
        samples += [StepSample(ld, cost.seconds(ld), gauge=reading) for ld in loads]
    start = replace(truth, chip=replace(truth.chip, efficiency=replace(
        truth.chip.efficiency, matmul=1.0, attention=1.0, memory=1.0, step_overhead_ms=5.0,
        seq_overhead_us=1.0, overlap=1.0)))

    def fitted(steps: list[StepSample]) -> float:
        eff = fit_efficiency(start, model, "fp32", steps)
        system = replace(start, chip=replace(start.chip, efficiency=eff))
        return max(abs(e) for e in step_errors(system, model, "fp32", steps))

    assert fitted(samples) < 0.05
    assert fitted([replace(s, gauge=None) for s in samples]) > 0.15


def test_gauge_report_compares_the_kept_runs() -> None:
    kept_cal = [(100.0, 40.0), (110.0, 44.0), (90.0, 36.0)]
    kept_val = [(121.0, 40.0)]
    every = [*kept_cal, *kept_val, (60.0, 20.0)]
    report = gauge_report(kept_cal, kept_val, every)
    assert report["calibration"] == [100.0, 40.0] and report["validation"] == [121.0, 40.0]
    assert report["low"] == [60.0, 20.0] and report["high"] == [121.0, 44.0]
    assert "(+21%, +0%)" in report["line"] and "5 readings 60-121 GFLOP/s" in report["line"]


def test_machine_gauge_reads_positive_rates() -> None:
    from tessera.sim.gauge import MachineGauge

    gflops, gb_s = MachineGauge().read()
    assert 0.1 < gflops < 1e5 and 0.1 < gb_s < 1e4
