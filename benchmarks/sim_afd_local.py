"""Simulated vs measured for the attention/FFN split on this machine (``tessera.sim.afd_local``).

In one run: calibrate the cost model for one thread (raw rates with one thread, then the
efficiency constants fitted to a one-thread engine's steps on the calibration workloads of
``tessera.sim.engine_probe``: the workers of the split run one thread each), measure the
data plane's one-way message time between two local processes, print the LM head share
(``--ffn-head-share``) the simulation finds best for M=1 and M=2, then run the split (A=1, F=1)
with M=1 and M=2 (at the given share) on the transformerless benchmark's workload and simulate
the same. Prints
measured and simulated output throughput and mean TPOT with the error; target: every error
within 10%. Exit status 1 when one is not.

Each measured case runs ``--repeats`` times and keeps the fastest run, as ``sim_local.py``
does (other tenants only ever slow a run down).

    python benchmarks/sim_afd_local.py [--model DIR] [--num-requests 64] [--max-tokens 64]
        [--ffn-head-share S]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOLERANCE = 0.10


def measure_split(model_dir: str, prompts: list[list[int]], max_tokens: int,
                  num_micro_batches: int, head_share: float) -> tuple[float, float]:
    """Output tokens/s and mean TPOT (ms) of the split, timed per request at the front."""
    from tessera import LLM, SamplingParams
    from tessera.afd.config import AFDConfig

    afd = AFDConfig(attention_workers=1, ffn_workers=1, micro_batches=num_micro_batches,
                    ffn_head_share=head_share)
    llm = LLM(model_dir, dtype="float32", device="cpu", num_threads=1, kv_cache_memory=1 << 30,
              afd=afd)
    try:
        engine = llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        count: dict[str, int] = {}
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            step = engine.step_with_deltas()
            now = time.perf_counter()
            for d in step.deltas:
                first.setdefault(d.request_id, now)
                last[d.request_id] = now
                count[d.request_id] = count.get(d.request_id, 0) + 1
        wall = time.perf_counter() - start
    finally:
        llm.close()
    tpot = [(last[r] - first[r]) * 1e3 / (count[r] - 1) for r in count if count[r] > 1]
    return sum(count.values()) / wall, sum(tpot) / len(tpot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=None, help="HF model dir (default: the ~100M Llama)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each measured case; the fastest is kept")
    parser.add_argument("--ffn-head-share", type=float, default=0.0, metavar="S",
                        help="share of the LM head on the FFN worker (measured and simulated)")
    parser.add_argument("--json", help="write the rows, the fitted profile and the latency here")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch

    from benchmarks.models import make_random_llama
    from tessera.model.loader import read_config
    from tessera.sim.afd_local import AFDLocalScenario, simulate_afd_local
    from tessera.sim.calibrate import calibrate_engine, measure
    from tessera.sim.engine_sim import EngineSimResult
    from tessera.sim.hardware import system_from_profile
    from tessera.sim.model import spec_from_config
    from tessera.sim.plane_latency import measure_plane_latency_s

    model_dir = args.model or make_random_llama(".bench/models/llama-100m")
    model = spec_from_config(read_config(model_dir), name=model_dir)
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # each worker of the split has one thread
    profile = calibrate_engine(measure(), model_dir, "float32", num_threads=1)
    system = system_from_profile(profile)
    eff, fit = system.chip.efficiency, profile["engine_fit"]
    kv_bytes = 4.0  # float32 cache
    rows_per_lane = max(1, args.num_requests // 2)
    latency_s = measure_plane_latency_s(model.hidden_size, rows_per_lane)
    print(f"calibrated (1 thread) in {time.perf_counter() - t0:.0f} s on {fit['num_steps']} "
          f"steps; median step error {fit['median_abs_step_error']:.1%}; matmul "
          f"{eff.matmul:.2f}, memory {eff.memory:.2f}, kv memory "
          f"{eff.kv_memory or eff.memory:.2f}, step {eff.step_overhead_ms:.2f} ms, per op "
          f"{eff.op_overhead_us:.1f} us; data plane {latency_s * 1e6:.0f} us one way "
          f"({rows_per_lane} x {model.hidden_size} float32)")

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(args.prompt_len)]
               for _ in range(args.num_requests)]
    def simulate(m: int, head_share: float) -> EngineSimResult:
        return simulate_afd_local(AFDLocalScenario(
            system=system, model=model, precision="fp32",
            prompt_tokens=(args.prompt_len,) * args.num_requests,
            output_tokens=(args.max_tokens,) * args.num_requests,
            num_blocks=1 << 16, num_micro_batches=m, transfer_latency_s=latency_s,
            copy_bytes_per_s=profile["copy_gb_s"] * 1e9 / 2,  # it counts read plus write
            kv_bytes_per_element=kv_bytes, ffn_head_share=head_share))

    # What the simulator advises before anything is measured: the LM head share per M.
    shares = [i / 10 for i in range(11)]
    for m in (1, 2):
        sims = [simulate(m, share).output_tokens_per_s for share in shares]
        best = max(range(len(shares)), key=sims.__getitem__)
        print(f"simulated M={m}: best --ffn-head-share {shares[best]:g} ({sims[best]:.1f} tok/s;"
              f" share 0: {sims[0]:.1f})")
    rows = []
    worst = 0.0
    for m in (1, 2):
        runs = [measure_split(model_dir, prompts, args.max_tokens, m, args.ffn_head_share)
                for _ in range(max(args.repeats, 1))]
        m_tps, m_tpot = max(runs)
        sim = simulate(m, args.ffn_head_share)
        s_tps, s_tpot = sim.output_tokens_per_s, sim.tpot_ms_mean
        err_tps, err_tpot = s_tps / m_tps - 1.0, s_tpot / m_tpot - 1.0
        worst = max(worst, abs(err_tps), abs(err_tpot))
        head = f", head {args.ffn_head_share:g}" if args.ffn_head_share else ""
        rows.append((f"A=1 F=1 M={m}{head}, {args.num_requests} x {args.prompt_len} in / "
                     f"{args.max_tokens} out", m_tps, s_tps, err_tps, m_tpot, s_tpot, err_tpot))
    print(f"\n{'workload':<40} {'tok/s meas':>10} {'sim':>8} {'err':>7} "
          f"{'TPOT ms meas':>12} {'sim':>8} {'err':>7}")
    for name, m_tps, s_tps, e1, m_tpot, s_tpot, e2 in rows:
        print(f"{name:<40} {m_tps:>10.1f} {s_tps:>8.1f} {e1:>+7.1%} {m_tpot:>12.1f} "
              f"{s_tpot:>8.1f} {e2:>+7.1%}")
    print(f"worst error {worst:.1%} (target {TOLERANCE:.0%}); {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            rows=rows, profile=profile, transfer_latency_s=latency_s),
            indent=2))
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
