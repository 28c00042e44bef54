"""Simulator speed: one 384-chip deployment with 100,000 requests, and a plan search.

Targets: the simulation under 60 s and a search over a few hundred deployments under 2 minutes.
"""

from __future__ import annotations

import sys
import time

from tessera.sim import Deployment, Scenario, Workload, simulate
from tessera.sim.planner import plan


def main() -> int:
    """Time both and print the figures."""
    dep = Deployment(mode="pd", precision="int8", num_dp=512, batch_per_dp=64,
                     num_micro_batches=2, num_prefill_devices=256, mtp_acceptance=0.85,
                     num_redundant_experts=64)
    wl = Workload(num_requests=100_000, input_tokens=2000, output_tokens=500,
                  request_rate_per_s=160.0, length_cv=0.5)
    start = time.perf_counter()
    res = simulate(Scenario("cloudmatrix384", "deepseek-v3", dep, wl))
    sim_s = time.perf_counter() - start
    print(f"simulate: 384 chips, {res.num_requests} requests ({res.num_finished} finished),"
          f" {res.num_events} events, {res.makespan_s:.0f} s simulated: {sim_s:.1f} s wall")
    start = time.perf_counter()
    best, feasible = plan("cloudmatrix384", "deepseek-v3", 384, 50.0, 2000.0, 2000, 500,
                          mtp=0.85)
    plan_s = time.perf_counter() - start
    print(f"plan: {len(feasible)} feasible deployments searched, {len(best)} reported"
          f" (3 verified by simulation): {plan_s:.1f} s wall")
    ok = sim_s < 60 and plan_s < 120
    print("targets met" if ok else "targets missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
