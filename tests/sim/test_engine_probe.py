"""The engine probe: real engine steps timed, with the load of each, as the simulator sees them
(through the engine's step observer hook and its stats, the engine itself untouched)."""

from typing import Any

import pytest

from tessera.config import CacheConfig, EngineConfig, SchedulerConfig
from tessera.engine.llm_engine import LLMEngine
from tessera.model.loader import read_config
from tessera.sim import engine_probe
from tessera.sim.engine_probe import (
    CALIBRATION_RUNS,
    StepSample,
    calibration_samples,
    fresh_run,
    random_prompts,
    record_steps,
    with_engine_facts,
)
from tessera.sim.engine_sim import EngineScenario, StepLoad, simulate_engine
from tessera.sim.errors import SimError
from tessera.sim.hardware import system_from_profile
from tessera.sim.model import ModelCosts, costs_from_config

PROFILE = {
    "tflops": {"fp32": 0.1, "bf16": 1.0}, "memory_gb": 16.0, "memory_gb_s": 10.0,
    "efficiency": {"matmul": 0.5, "attention": 0.2, "memory": 0.8, "fabric": 1.0,
                   "op_overhead_us": 2.0, "ops_per_layer": 14, "step_overhead_ms": 0.5},
}


@pytest.fixture(scope="module")
def engine_and_spec(model_factory: Any) -> tuple[LLMEngine, ModelCosts]:
    path, _ = model_factory("llama")
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu",
                                    scheduler=SchedulerConfig(max_num_seqs=256),
                                    cache=CacheConfig(kv_cache_memory=16 << 20)))
    return engine, costs_from_config(read_config(str(path)))


@pytest.mark.parametrize("in_flight", [None, 1, 2])
def test_closed_loop_probe_schedules_as_the_simulated_client(
        engine_and_spec: tuple[LLMEngine, ModelCosts], in_flight: int | None) -> None:
    engine, spec = engine_and_spec
    lengths, outputs = [9, 30, 4, 17, 12], [3, 5, 2, 4, 3]
    prompts = [random_prompts(1, n, spec.vocab_size, seed=i)[0] for i, n in enumerate(lengths)]
    run = record_steps(engine, spec, prompts, outputs, 4.0, max_in_flight=in_flight)
    assert run.num_output_tokens == sum(outputs)
    assert max(s.load.num_seqs for s in run.samples) == (in_flight or len(prompts))
    assert len(run.ttft_ms) == len(prompts) and min(run.ttft_ms) > 0
    assert not engine.has_unfinished_requests()
    # The simulator's closed-loop client, on the engine's own scheduler, takes the same steps.
    sim = simulate_engine(EngineScenario(
        system=system_from_profile(PROFILE), model=spec, precision="fp32",
        prompt_tokens=tuple(lengths), output_tokens=tuple(outputs),
        num_blocks=engine.runtime.num_kv_blocks, max_num_seqs=256, concurrency=in_flight,
        max_num_batched_tokens=engine.config.scheduler.max_num_batched_tokens))
    assert sim.num_steps == len(run.samples)


def test_probe_rejects_mismatched_lengths(engine_and_spec: tuple[LLMEngine, ModelCosts]) -> None:
    engine, spec = engine_and_spec
    with pytest.raises(ValueError, match="one output length"):
        record_steps(engine, spec, [[1, 2]], [3, 4], 4.0)
    with pytest.raises(ValueError, match="at least 1"):
        record_steps(engine, spec, [[1, 2]], [3], 4.0, max_in_flight=0)


def test_probe_observes_through_the_hook_and_removes_its_observer(
        engine_and_spec: tuple[LLMEngine, ModelCosts], monkeypatch: pytest.MonkeyPatch) -> None:
    engine, spec = engine_and_spec
    added: list[object] = []
    removed: list[object] = []
    add, remove = engine.add_step_observer, engine.remove_step_observer
    monkeypatch.setattr(engine, "add_step_observer", lambda fn: (added.append(fn), add(fn)))
    monkeypatch.setattr(engine, "remove_step_observer",
                        lambda fn: (removed.append(fn), remove(fn)))
    run = record_steps(engine, spec, random_prompts(2, 8, spec.vocab_size, seed=5), [2, 3], 4.0)
    assert len(run.samples) == 3 and added == removed and len(added) == 1
    # A prompt the engine refuses fails the run; the observer still goes.
    with pytest.raises(ValueError):
        record_steps(engine, spec, [[spec.vocab_size + 10]], [1], 4.0)
    assert added == removed and len(added) == 2


def test_calibration_keeps_each_workloads_fastest_of_its_rounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``tessera sim calibrate``'s samples: every workload once per round, in order, with a
    new prompt seed per round; per workload the fastest round's run."""
    calls: list[tuple[int, int]] = []

    def fake_run(engine, model, kv_bytes, index, seed):  # type: ignore[no-untyped-def]
        calls.append((index, seed))
        seconds = 1.0 if (index + seed // 1000) % 2 else 2.0  # odd (index + round) is fast
        return [StepSample(StepLoad(1, 1, 1, 0.0, float(index)), seconds)]

    monkeypatch.setattr(engine_probe, "calibration_run", fake_run)
    samples = calibration_samples(None, None, 4.0, seed=7, repeats=2)  # type: ignore[arg-type]
    num = len(CALIBRATION_RUNS)
    assert calls == [(k, 7 + 1000 * r) for r in range(2) for k in range(num)]
    assert [s.load.kv_bytes for s in samples] == [float(k) for k in range(num)]
    assert all(s.seconds == 1.0 for s in samples)


def test_engine_facts_name_the_cpu_kernels_batch_sizes(
        engine_and_spec: tuple[LLMEngine, ModelCosts]) -> None:
    engine, _ = engine_and_spec
    facts = with_engine_facts({"efficiency": {}, "host": {"seq_overhead_us": 3.0}}, engine)
    host = facts["host"]
    assert host["seq_overhead_us"] == 3.0  # the other host costs are kept
    assert isinstance(host["native_decode_rows"], int) and host["native_decode_rows"] >= 0
    assert isinstance(host["kv_whole_batch"], int) and host["kv_whole_batch"] >= 0


def test_probe_counts_prefix_cache_hits_and_fresh_run_rejects_them(
        engine_and_spec: tuple[LLMEngine, ModelCosts]) -> None:
    """The simulator gives every request its own prompt, so a measured run that took prompt
    tokens from the prefix cache (its prompts began like an earlier run's) did other work."""
    engine, spec = engine_and_spec
    prompt = random_prompts(1, 40, spec.vocab_size, seed=77)[0]
    first = fresh_run(record_steps(engine, spec, [prompt], [2], 4.0))
    assert first.num_prefix_hit_tokens == 0
    again = record_steps(engine, spec, [prompt[:36] + [1, 2, 3, 4]], [2], 4.0)
    assert again.num_prefix_hit_tokens == 32  # two full 16-token blocks
    with pytest.raises(SimError, match="32 prompt tokens from the prefix cache"):
        fresh_run(again)
