"""Property: whatever the workload, every request is accounted for and times are ordered."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.sim.deployment import Deployment
from tessera.sim.simulator import Scenario, simulate
from tessera.sim.workload import Workload


@settings(max_examples=12, deadline=None)
@given(mode=st.sampled_from(["colocated", "pd", "afd"]), n=st.integers(1, 60),
       inp=st.integers(1, 600), out=st.integers(1, 60), cv=st.sampled_from([0.0, 0.8]),
       closed=st.booleans(), batch=st.integers(1, 8), hit=st.sampled_from([0.0, 0.5]))
def test_requests_conserved(mode: str, n: int, inp: int, out: int, cv: float, closed: bool,
                            batch: int, hit: float) -> None:
    dep = Deployment(mode=mode, precision="fp8", num_dp=4, batch_per_dp=batch,
                     num_ffn_devices=4 if mode == "afd" else 0, num_micro_batches=2,
                     num_prefill_devices=0 if mode == "colocated" else 4)
    wl = Workload(num_requests=n, input_tokens=inp, output_tokens=out, length_cv=cv,
                  prefix_hit_fraction=hit, concurrency=3 if closed else None,
                  request_rate_per_s=None if closed else 20.0)
    res = simulate(Scenario("dgx-h200", "qwen3-235b-a22b", dep, wl, seed=n))
    assert res.num_finished == n and res.num_unfinished == 0
    assert res.ttft_ms_mean > 0 and np.isfinite(res.tpot_ms_p99)
    assert res.makespan_s > 0
