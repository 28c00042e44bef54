"""The engine simulated on a virtual clock, and fitting the cost model to engine steps."""

from dataclasses import replace

import pytest

from tessera.config import SchedulerConfig
from tessera.engine.block_manager import BlockManager
from tessera.engine.scheduler import Scheduler
from tessera.engine.sequence import Sequence
from tessera.sampling_params import SamplingParams
from tessera.sim.costmodel import PREFILL_OPS_PER_CHUNK
from tessera.sim.engine_probe import StepSample, fastest_rounds, fastest_runs
from tessera.sim.engine_sim import (
    EngineScenario,
    StepCost,
    StepLoad,
    simulate_engine,
    step_load,
)
from tessera.sim.errors import SimError
from tessera.sim.fit import fit_system, step_errors
from tessera.sim.hardware import HOST_FIELDS, system_from_profile
from tessera.sim.model import costs_from_config

CFG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=128, vocab_size=300)
PROFILE = {
    "tflops": {"fp32": 0.1, "bf16": 1.0},
    "memory_gb": 16.0,
    "memory_gb_s": 10.0,
    "efficiency": {"matmul": 0.5, "attention": 0.2, "memory": 0.8, "fabric": 1.0,
                   "op_overhead_us": 2.0, "ops_per_layer": 14, "step_overhead_ms": 0.5},
    "host": {"seq_overhead_us": 20.0},
}


def profile_with(**consts: object) -> dict:
    """PROFILE with ``consts`` set, each in its block (chip efficiency or host costs)."""
    eff = {k: v for k, v in consts.items() if k not in HOST_FIELDS}
    host = {k: v for k, v in consts.items() if k in HOST_FIELDS}
    return {**PROFILE, "efficiency": {**PROFILE["efficiency"], **eff},
            "host": {**PROFILE["host"], **host}}


def _scenario(**kw: object) -> EngineScenario:
    base = dict(system=system_from_profile(PROFILE), model=costs_from_config(CFG),
                precision="fp32", prompt_tokens=(40, 100, 7, 300), output_tokens=(5, 1, 20, 9),
                num_blocks=64, max_num_batched_tokens=128)
    base.update(kw)
    return EngineScenario(**base)  # type: ignore[arg-type]


def test_every_request_finishes_with_its_tokens() -> None:
    res = simulate_engine(_scenario())
    assert res.num_output_tokens == 5 + 1 + 20 + 9
    assert len(res.ttft_ms) == 4 and all(t > 0 for t in res.ttft_ms)
    assert len(res.tpot_ms) == 3 and all(t > 0 for t in res.tpot_ms)
    # The 7-token prompt cannot start in step 1 (40 + 88 tokens fill the 128 budget); then it
    # needs one step per output token.
    assert res.num_steps >= 1 + 20


def test_small_pool_preempts_and_still_finishes() -> None:
    sc = _scenario(prompt_tokens=(60,) * 6, output_tokens=(40,) * 6, num_blocks=14)
    res = simulate_engine(sc)
    assert res.num_preemptions > 0
    assert res.num_output_tokens == 240


def test_arrivals_delay_first_tokens() -> None:
    res = simulate_engine(_scenario(arrival_s=(0.0, 0.0, 5.0, 5.0)))
    assert res.duration_s > 5.0
    assert max(res.ttft_ms) < 5000.0  # measured from each request's own arrival


def test_bad_scenarios_raise() -> None:
    with pytest.raises(SimError, match="does not fit"):
        simulate_engine(_scenario(num_blocks=2))
    with pytest.raises(SimError, match="one entry per request"):
        simulate_engine(_scenario(output_tokens=(1,)))


def test_step_load_counts_decode_and_prefill_work() -> None:
    model = costs_from_config(CFG)
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm)
    a = Sequence("a", list(range(6)), SamplingParams(max_tokens=4))
    sched.add(a)
    out = sched.schedule()
    sched.update(out, [1])  # a prefilled: 6 prompt tokens + 1 sampled
    b = Sequence("b", list(range(100, 110)), SamplingParams(max_tokens=4))
    sched.add(b)
    out = sched.schedule()
    load = step_load(model, out, kv_bytes_per_element=4.0)
    assert (load.num_seqs, load.num_tokens, load.num_sampled) == (2, 11, 2)
    kv_token = model.kv_elements_per_token * 4.0 * model.num_layers
    assert load.kv_bytes == pytest.approx(kv_token * (7 + 10))
    pairs = 10 * 11 / 2  # causal prefill of 10 tokens
    assert load.attention_flops == pytest.approx(
        model.num_layers * (model.attn_flops_per_kv_decode * 7
                            + model.attn_flops_per_pair_prefill * pairs))
    # The chunk's part, which the engine runs in a kernel of its own after the decode kernel.
    assert (load.num_prefill_chunks, load.num_prefill_rows) == (1, 10)
    assert load.prefill_attention_flops == pytest.approx(
        model.num_layers * model.attn_flops_per_pair_prefill * pairs)
    assert load.prefill_kv_bytes == pytest.approx(kv_token * 10)


def test_prefill_chunk_after_context_pays_the_full_masked_rectangle() -> None:
    model = costs_from_config(CFG)
    bm = BlockManager(32, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16), bm)
    sched.add(Sequence("a", list(range(24)), SamplingParams(max_tokens=2)))
    first = sched.schedule()
    assert first.num_new_tokens == [16]
    sched.update(first, [None])
    second = sched.schedule()
    assert second.num_new_tokens == [8]
    load = step_load(model, second, kv_bytes_per_element=4.0)
    # 8 queries after 16 cached tokens, every score of the 8 x 24 masked block computed.
    assert load.attention_flops == pytest.approx(
        model.num_layers * model.attn_flops_per_pair_prefill * 8 * 24)


def test_fit_recovers_the_constants_that_made_the_samples() -> None:
    model = costs_from_config(CFG)
    truth = system_from_profile(profile_with(overlap=0.5))
    cost = StepCost(truth, model, "fp32")
    loads = [StepLoad(num_seqs=s, num_tokens=t, num_sampled=s, attention_flops=f, kv_bytes=k)
             for s, t, f, k in [(1, 1, 1e5, 1e5), (8, 8, 1e6, 1e6), (32, 32, 1e7, 5e6),
                                (2, 1024, 1e9, 1e6), (4, 512, 3e8, 2e6), (64, 64, 4e7, 3e7),
                                (1, 2048, 4e9, 2e6), (16, 16, 2e6, 4e7), (3, 300, 1e8, 1e6),
                                (24, 24, 3e6, 2e7)]]
    samples = [StepSample(ld, cost.seconds(ld)) for ld in loads]
    start = replace(truth, host=replace(truth.host, seq_overhead_us=1.0),
                    chip=replace(truth.chip, efficiency=replace(
                        truth.chip.efficiency, matmul=1.0, attention=1.0, memory=1.0,
                        step_overhead_ms=5.0, overlap=1.0)))
    assert max(abs(e) for e in step_errors(start, model, "fp32", samples)) > 0.3
    fitted = fit_system(start, model, "fp32", samples)
    assert max(abs(e) for e in step_errors(fitted, model, "fp32", samples)) < 0.05
    assert fitted.host.seq_overhead_us > 5.0  # the host cost moved from 1 us towards 20


def test_overlap_blends_roofline_max_and_sum() -> None:
    model = costs_from_config(CFG)
    load = StepLoad(num_seqs=4, num_tokens=4, num_sampled=4, attention_flops=1e6, kv_bytes=1e6)

    def seconds(overlap: float) -> float:
        return StepCost(system_from_profile(profile_with(overlap=overlap)), model,
                        "fp32").seconds(load)

    # Hiding less of each op's shorter leg can only lengthen the step, and does, linearly.
    assert seconds(1.0) < seconds(0.5) < seconds(0.0)
    assert seconds(0.5) == pytest.approx((seconds(1.0) + seconds(0.0)) / 2.0)


def test_closed_loop_keeps_concurrency_in_flight() -> None:
    sc = _scenario(prompt_tokens=(20,) * 6, output_tokens=(10,) * 6)
    closed = simulate_engine(replace(sc, concurrency=2))
    offline = simulate_engine(sc)
    assert closed.num_output_tokens == offline.num_output_tokens == 60
    # Requests queue behind two in flight instead of all at once: first tokens come sooner
    # after arrival, but the run takes longer than serving all six together.
    assert max(closed.ttft_ms) < max(offline.ttft_ms)
    assert closed.duration_s > offline.duration_s


def _cost(**consts: object) -> StepCost:
    return StepCost(system_from_profile(profile_with(**consts)), costs_from_config(CFG), "fp32")


def test_a_steps_kv_bytes_are_read_once_over_all_layers() -> None:
    """StepLoad counts the KV bytes of all layers; the cost model charges attention per layer,
    so the step's total must be split over the layers, not charged once per layer."""
    cost = _cost(overlap=0.0, kv_memory=0.5)
    base = StepLoad(num_seqs=1, num_tokens=1, num_sampled=1, attention_flops=0.0, kv_bytes=0.0)
    kv_bytes = 4e6
    extra = cost.seconds(replace(base, kv_bytes=kv_bytes)) - cost.seconds(base)
    rate = PROFILE["memory_gb_s"] * 1e9 * 0.5  # type: ignore[operator]
    assert extra == pytest.approx(kv_bytes / rate)


def test_decode_batches_below_the_whole_sequence_batch_read_kv_at_the_split_rate() -> None:
    cost = _cost(overlap=0.0, kv_memory=0.5, kv_memory_split=0.25, kv_whole_batch=4)
    kv_bytes = 4e6
    rate = PROFILE["memory_gb_s"] * 1e9  # type: ignore[operator]
    for seqs, eff in ((1, 0.25), (3, 0.25), (4, 0.5), (9, 0.5)):
        base = StepLoad(num_seqs=seqs, num_tokens=seqs, num_sampled=seqs, attention_flops=0.0,
                        kv_bytes=0.0)
        extra = cost.seconds(replace(base, kv_bytes=kv_bytes)) - cost.seconds(base)
        assert extra == pytest.approx(kv_bytes / (rate * eff)), seqs
    # Without a whole-sequence batch (every catalog chip) the split rate is never used.
    plain = _cost(overlap=0.0, kv_memory=0.5, kv_memory_split=0.25)
    base = StepLoad(num_seqs=1, num_tokens=1, num_sampled=1, attention_flops=0.0, kv_bytes=0.0)
    extra = plain.seconds(replace(base, kv_bytes=kv_bytes)) - plain.seconds(base)
    assert extra == pytest.approx(kv_bytes / (rate * 0.5))


def test_fit_recovers_a_split_kv_rate() -> None:
    model = costs_from_config(CFG)
    truth = system_from_profile(profile_with(kv_memory=0.6, kv_memory_split=0.3,
                                             kv_whole_batch=8))
    cost = StepCost(truth, model, "fp32")
    loads = [StepLoad(num_seqs=s, num_tokens=s, num_sampled=s, attention_flops=1e5 * s,
                      kv_bytes=k) for s, k in [(1, 4e7), (2, 8e7), (4, 1e8), (8, 2e8),
                                               (16, 3e8), (32, 4e8), (64, 5e8), (6, 1e6),
                                               (24, 2e6), (3, 5e7)]]
    samples = [StepSample(ld, cost.seconds(ld)) for ld in loads]
    start = replace(truth, host=replace(truth.host, kv_memory_split=None),
                    chip=replace(truth.chip, efficiency=replace(truth.chip.efficiency,
                                                                kv_memory=None)))
    fitted = fit_system(start, model, "fp32", samples)
    assert fitted.chip.efficiency.kv_memory == pytest.approx(0.6, rel=0.05)
    assert fitted.host.kv_memory_split == pytest.approx(0.3, rel=0.05)


def test_native_decode_steps_pay_no_per_op_launches() -> None:
    model = costs_from_config(CFG)
    plain, native = _cost(), _cost(native_decode_rows=3)
    launches = model.num_layers * 14 * 2.0e-6  # ops_per_layer x op_overhead_us of PROFILE
    for seqs in (1, 3):
        load = StepLoad(num_seqs=seqs, num_tokens=seqs, num_sampled=seqs, attention_flops=1e5,
                        kv_bytes=1e5)
        assert plain.seconds(load) - native.seconds(load) == pytest.approx(launches)
    # More rows than the native path takes, or a prefill chunk: launched op by op.
    for seqs, tokens in ((4, 4), (1, 3)):
        load = StepLoad(num_seqs=seqs, num_tokens=tokens, num_sampled=seqs,
                        attention_flops=1e5, kv_bytes=1e5)
        assert plain.seconds(load) == native.seconds(load)


def test_calibration_keeps_each_workloads_fastest_whole_run() -> None:
    # Per-step minima over the runs (0.9 + 0.9) would be faster than either run (2.0, 1.9):
    # the kept samples of a workload must be one run's, the one with the smallest total.
    load = StepLoad(num_seqs=1, num_tokens=1, num_sampled=1, attention_flops=0.0, kv_bytes=0.0)
    slow_then_fast = [StepSample(load, 1.1), StepSample(load, 0.9)]
    fast_then_slow = [StepSample(load, 0.9), StepSample(load, 1.0)]
    other_a, other_b = [StepSample(load, 3.0)], [StepSample(load, 2.0)]
    # Two rounds, each one run of two workloads; workload 2's faster run is in round 2.
    rounds = [[slow_then_fast, other_a], [fast_then_slow, other_b]]
    assert fastest_runs(rounds) == fast_then_slow + other_b
    assert fastest_runs(rounds[::-1]) == fast_then_slow + other_b
    assert fastest_rounds(rounds) == [1, 1]
    assert fastest_rounds([[fast_then_slow, other_a], [slow_then_fast, other_b]]) == [0, 1]


def test_decode_and_prefill_attention_are_separate_kernels() -> None:
    """A step's decodes read KV in the paged kernel and its chunks compute in SDPA, one after
    the other: the decode read is not hidden under the chunk's FLOPs, even at overlap 1."""
    cost = _cost(overlap=1.0, kv_memory=0.5)
    layers = costs_from_config(CFG).num_layers
    # Two decodes and one 62-token chunk; attention work first left out, then added.
    base = StepLoad(num_seqs=3, num_tokens=64, num_sampled=3, attention_flops=0.0, kv_bytes=0.0,
                    num_prefill_chunks=1)
    decode_kv, chunk_flops = 4e6, 4e8
    step = replace(base, attention_flops=chunk_flops, kv_bytes=decode_kv,
                   prefill_attention_flops=chunk_flops)
    extra = cost.seconds(step) - cost.seconds(base)
    read_s = decode_kv / (PROFILE["memory_gb_s"] * 1e9 * 0.5)  # type: ignore[operator]
    compute_s = chunk_flops / (PROFILE["tflops"]["bf16"] * 1e12 * 0.2)  # type: ignore[index]
    assert extra == pytest.approx(read_s + compute_s)
    # The same work as one op (how a load without the split is costed): the longer leg only.
    merged = replace(step, num_prefill_chunks=0, prefill_attention_flops=0.0)
    base_merged = replace(base, num_prefill_chunks=0)
    assert cost.seconds(merged) - cost.seconds(base_merged) == pytest.approx(
        max(read_s, compute_s))
    assert layers == 2  # the totals are over both layers, as the rates above assume


def test_prefill_rows_pay_the_attention_row_cost_and_chunks_their_ops() -> None:
    layers = costs_from_config(CFG).num_layers
    plain, rowed = _cost(), _cost(attention_row_us=3.0)
    load = StepLoad(num_seqs=5, num_tokens=100, num_sampled=5, attention_flops=1e6,
                    kv_bytes=1e5, num_prefill_chunks=2, prefill_attention_flops=1e6,
                    prefill_kv_bytes=1e5)
    assert load.num_prefill_rows == 97  # 3 decodes, 97 prompt tokens in the two chunks
    assert rowed.seconds(load) - plain.seconds(load) == pytest.approx(97 * layers * 3e-6)
    # Each chunk's own SDPA call and output copy are host ops of their own.
    one_chunk = replace(load, num_prefill_chunks=1)
    assert plain.seconds(load) - plain.seconds(one_chunk) == pytest.approx(
        layers * PREFILL_OPS_PER_CHUNK * 2.0e-6)  # PROFILE's op_overhead_us
    # Decode-only steps have no prefill rows.
    decode = StepLoad(num_seqs=4, num_tokens=4, num_sampled=4, attention_flops=1e5,
                      kv_bytes=1e5)
    assert rowed.seconds(decode) == plain.seconds(decode)

