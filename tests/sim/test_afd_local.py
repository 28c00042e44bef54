"""The attention/FFN split on a virtual clock: every request finishes; with one lane the two
workers take turns (the step is the serial sum, plus two transfers per layer); with two lanes
one lane's FFN hides under the other's attention, within what the busier worker allows."""

from __future__ import annotations

import pytest

from tessera.sim.afd_local import AFDLocalScenario, _UnitCosts, simulate_afd_local
from tessera.sim.engine_sim import StepLoad
from tessera.sim.errors import SimError
from tessera.sim.hardware import system_from_profile
from tessera.sim.model import spec_from_config
from tests.sim.test_engine_sim import CFG, PROFILE


def _scenario(**kw: object) -> AFDLocalScenario:
    base = dict(system=system_from_profile(PROFILE), model=spec_from_config(CFG),
                precision="fp32", prompt_tokens=(1,), output_tokens=(6,), num_blocks=64,
                num_micro_batches=1, transfer_latency_s=0.0)
    base.update(kw)
    return AFDLocalScenario(**base)  # type: ignore[arg-type]


def _serial_step_s(sc: AFDLocalScenario, load: StepLoad) -> float:
    costs = _UnitCosts(sc.system, sc.model, sc.precision)
    layers = range(sc.model.num_layers)
    return (sum(costs.attention(load) + costs.ffn(load, i) for i in layers)
            + costs.head(load, 1.0) + costs.tail(load)
            + 2 * sc.model.num_layers * sc.transfer_latency_s)


@pytest.mark.parametrize(("latency_s", "head_share"), [(0.0, 0.0), (1e-3, 0.0), (0.0, 0.5)])
def test_one_lane_takes_turns(latency_s: float, head_share: float) -> None:
    # One request of one prompt token: every step is one token (prefill, then decodes) over a
    # context growing by one, so the whole run is a sum of serial steps. With half the LM head
    # on the FFN worker the two halves run side by side: a step saves half the head's time
    # and pays the FFN worker's launch of it.
    sc = _scenario(transfer_latency_s=latency_s, ffn_head_share=head_share)
    res = simulate_afd_local(sc)
    kv_per_token = sc.model.kv_elements_per_token * sc.kv_bytes_per_element * sc.model.num_layers
    costs = _UnitCosts(sc.system, sc.model, sc.precision)
    loads = [StepLoad(num_seqs=1, num_tokens=1, num_sampled=1,
                      attention_flops=sc.model.attn_flops_per_kv_decode * n * sc.model.num_layers,
                      kv_bytes=kv_per_token * n) for n in range(1, 7)]
    want = sum(_serial_step_s(sc, load)
               - (head_share * costs.head(load, 1.0) - costs.op_s if head_share else 0.0)
               for load in loads)
    assert costs.head(loads[0], 1.0) > 2 * costs.op_s  # a real saving, not a wash
    assert res.num_output_tokens == 6 and res.num_steps == 6
    assert res.duration_s == pytest.approx(want, rel=1e-9)


def test_two_lanes_overlap_within_the_busier_worker() -> None:
    # Compute-bound layers that outweigh a step's fixed costs. (Where a step is mostly its LM
    # head and host work, or the FFN streams its weights whatever the rows, two lanes lose:
    # each pays those again.)
    cfg = {**CFG, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4}
    eff = {**PROFILE["efficiency"], "step_overhead_ms": 0.01, "seq_overhead_us": 0.0}
    fast_memory = {**PROFILE, "memory_gb_s": 1000.0, "efficiency": eff}
    sc = _scenario(system=system_from_profile(fast_memory),
                   model=spec_from_config(cfg), prompt_tokens=(8,) * 16,
                   output_tokens=(20,) * 16, transfer_latency_s=2e-5)
    one = simulate_afd_local(sc)
    two = simulate_afd_local(_scenario(**{**sc.__dict__, "num_micro_batches": 2}))
    assert one.num_output_tokens == two.num_output_tokens == 16 * 20
    assert len(two.tpot_ms) == 16 and all(t > 0 for t in two.tpot_ms)
    # Overlap helps, but never beyond running the two workers' total work side by side.
    assert two.duration_s < one.duration_s
    assert two.duration_s > one.duration_s / 2


def test_a_pool_too_small_for_a_request_is_an_error() -> None:
    with pytest.raises(SimError):
        simulate_afd_local(_scenario(prompt_tokens=(2000,), num_blocks=4))
