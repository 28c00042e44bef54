"""A local system rated at another machine-speed reading, and a fit that costs each step at
the reading around its run."""

from dataclasses import replace

import pytest

from tessera.sim.engine_probe import StepSample
from tessera.sim.engine_sim import StepCost, StepLoad
from tessera.sim.fit import fit_system, step_errors
from tessera.sim.hardware import get_system, system_at, system_from_profile
from tessera.sim.model import costs_from_config
from tests.sim.test_engine_sim import CFG

REF = (200.0, 40.0)  # the gauge reading at which PROFILE's rates were measured
PROFILE = {
    "tflops": {"fp32": 0.1, "bf16": 1.0},
    "memory_gb": 16.0,
    "memory_gb_s": 10.0,
    "gauge": list(REF),
    "efficiency": {"matmul": 0.5, "attention": 0.2, "memory": 0.8, "fabric": 1.0,
                   "op_overhead_us": 2.0, "ops_per_layer": 14, "step_overhead_ms": 0.5,
                   "overlap": 0.5},
    "host": {"seq_overhead_us": 20.0},
}


def test_system_at_scales_each_rate_by_its_own_reading() -> None:
    system = system_from_profile(PROFILE)
    assert system.chip.gauge == REF
    fast = system_at(system, (300.0, 60.0))  # 1.5x the matrix rate, 1.5x the memory
    assert fast.chip.tflops["fp32"] == pytest.approx(0.15)
    assert fast.chip.tflops["bf16"] == pytest.approx(1.5)
    assert fast.chip.memory_bytes_per_s == pytest.approx(15e9)
    # KV reads keep their bytes per second: the CPU attention kernel sets that pace.
    for rated in (fast, system_at(system, (200.0, 20.0))):
        kv, split = rated.chip.efficiency.kv_memory, rated.host.kv_memory_split
        assert kv is not None and split is not None
        assert rated.chip.memory_bytes_per_s * kv == pytest.approx(8e9)
        assert rated.chip.memory_bytes_per_s * split == pytest.approx(8e9)
    slow_memory = system_at(system, (200.0, 20.0))  # memory only, halved
    assert slow_memory.chip.tflops == system.chip.tflops
    assert slow_memory.chip.memory_bytes_per_s == pytest.approx(5e9)
    # Rated twice: the second reading is against the first one, not the profile's.
    assert system_at(fast, REF).chip.memory_bytes_per_s == pytest.approx(10e9)
    assert system_at(system, None) is system
    catalog = get_system("dgx-h100")  # no reference reading: left as it is
    assert catalog.chip.gauge is None and system_at(catalog, (1.0, 1.0)) is catalog


def test_fit_with_readings_sees_through_a_machine_that_changed_speed() -> None:
    """Steps measured while the machine ran slower for a while (60% of its matrix rate, a third
    of its weight-streaming rate): costed at each run's reading, the fit recovers the constants
    that made them; blind to the readings, no set of constants explains both halves."""
    model = costs_from_config(CFG)
    truth = system_from_profile(PROFILE)
    loads = [StepLoad(num_seqs=s, num_tokens=t, num_sampled=s, attention_flops=f, kv_bytes=k)
             for s, t, f, k in [(1, 1, 1e5, 1e5), (8, 8, 1e6, 1e6), (32, 32, 1e7, 5e6),
                                (2, 1024, 1e9, 1e6), (4, 512, 3e8, 2e6), (64, 64, 4e7, 3e7),
                                (1, 2048, 4e9, 2e6), (16, 16, 2e6, 4e7), (3, 300, 1e8, 1e6)]]
    samples = []
    for reading in (REF, (REF[0] * 0.6, REF[1] / 3)):  # every workload once at each speed
        cost = StepCost(system_at(truth, reading), model, "fp32")
        samples += [StepSample(ld, cost.seconds(ld), gauge=reading) for ld in loads]
    start = replace(truth, host=replace(truth.host, seq_overhead_us=1.0),
                    chip=replace(truth.chip, efficiency=replace(
                        truth.chip.efficiency, matmul=1.0, attention=1.0, memory=1.0,
                        step_overhead_ms=5.0, overlap=1.0)))

    def fitted(steps: list[StepSample]) -> float:
        system = fit_system(start, model, "fp32", steps)
        return max(abs(e) for e in step_errors(system, model, "fp32", steps))

    assert fitted(samples) < 0.05
    assert fitted([replace(s, gauge=None) for s in samples]) > 0.15


def test_machine_gauge_reads_positive_rates() -> None:
    from tessera.sim.calibrate import MachineGauge

    gflops, gb_s = MachineGauge().read()
    assert 0.1 < gflops < 1e5 and 0.1 < gb_s < 1e4
