"""The attention/FFN split on a virtual clock: every request finishes; with one lane the two
workers take turns (the step is the serial sum, plus two transfers per layer); with two lanes
one lane's FFN hides under the other's attention, within what the busier worker allows."""

from __future__ import annotations

import pytest

from benchmarks.simlab import afd_local
from benchmarks.simlab.afd_local import AFDLocalScenario, _UnitCosts, simulate_afd_local
from tessera.afd.lane_policy import pick_lane
from tessera.sim.engine_sim import StepLoad
from tessera.sim.errors import SimError
from tessera.sim.hardware import system_from_profile
from tessera.sim.model import costs_from_config
from tests.sim.test_engine_sim import CFG, PROFILE


def _scenario(**kw: object) -> AFDLocalScenario:
    base = dict(system=system_from_profile(PROFILE), model=costs_from_config(CFG),
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
    eff = {**PROFILE["efficiency"], "step_overhead_ms": 0.01}
    fast_memory = {**PROFILE, "memory_gb_s": 1000.0, "efficiency": eff,
                   "host": {"seq_overhead_us": 0.0}}
    sc = _scenario(system=system_from_profile(fast_memory),
                   model=costs_from_config(cfg), prompt_tokens=(8,) * 16,
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


def test_new_requests_join_the_lane_the_workers_policy_picks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The lanes are filled by ``tessera.afd.lane_policy.pick_lane``, the attention worker's own
    rule, not a copy of it: one request per pick, each seeing every lane's unfinished count."""
    seen: list[list[int]] = []

    def spy(num_unfinished: list[int]) -> int:
        seen.append(list(num_unfinished))
        return pick_lane(num_unfinished)

    monkeypatch.setattr(afd_local, "pick_lane", spy)
    res = simulate_afd_local(_scenario(prompt_tokens=(4,) * 5, output_tokens=(2,) * 5,
                                       num_micro_batches=2))
    assert res.num_output_tokens == 10
    assert seen == [[0, 0], [1, 0], [1, 1], [2, 1], [2, 2]]


def test_moe_layers_run_the_experts_the_config_places() -> None:
    """A Qwen3-MoE whose every second layer is sparse (``decoder_sparse_step``) and whose
    first is dense (``mlp_only_layers``): the FFN worker runs experts on exactly those layers."""
    cfg = {**CFG, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
           "num_hidden_layers": 4, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "decoder_sparse_step": 2, "mlp_only_layers": [1]}
    sc = _scenario(model=costs_from_config(cfg))
    costs = _UnitCosts(sc.system, sc.model, sc.precision)
    load = StepLoad(num_seqs=1, num_tokens=1, num_sampled=1, attention_flops=1.0, kv_bytes=1.0)
    dense, moe = costs.pool.ffn_unit_s(1, False), costs.pool.ffn_unit_s(1, True)
    assert dense != moe
    assert [costs.ffn(load, i) - costs.ffn_ops_s for i in range(4)] == pytest.approx(
        [dense, dense, dense, moe])  # layer 1 is listed dense; layer 3 is the one sparse step
