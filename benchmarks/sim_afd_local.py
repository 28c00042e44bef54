"""Simulated vs measured for the attention/FFN split on this machine (``simlab.afd_local``).

In one run: measure the raw rates with one thread and the data plane's one-way message time
between two local processes; then run rounds (``--rounds``, each in a shuffled order) of the
calibration workloads of ``tessera.sim.engine_probe`` on a one-thread engine (each worker of the split has one thread)
and of the transformerless benchmark's workload on the split (A=1, F=1) with M=1 and M=2, at
the given ``--ffn-head-share``. Fit the efficiency constants to the calibration steps, print
the LM head share the simulation finds best for M=1 and M=2, and simulate the measured
workload. Prints measured and simulated output throughput and mean TPOT with the error;
target: every error within 10%. Exit status 1 when one is not.

Per workload the fastest run over the rounds counts, as in ``sim_local.py`` (other tenants
only ever slow a run down; mixing the two kinds in every round lets calibration and
measurement both come from the machine's quiet stretches), and, as there, the report adds the
errors of a fit and simulation rated at the machine gauge reading around each run. The splits
stay up across rounds: the first run on a fresh split also pays its workers' one-time costs
(their heaps grow to the size of a full prefill step, page by page), which the simulation does
not model.

    python benchmarks/sim_afd_local.py [--model DIR] [--num-requests 64] [--max-tokens 64]
        [--ffn-head-share S] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOLERANCE = 0.10


def open_split(model_dir: str, num_micro_batches: int, head_share: float) -> Any:
    """The split (A=1, F=1, one thread each) as an offline ``LLM``."""
    from tessera import LLM
    from tessera.config import AFDConfig

    afd = AFDConfig(attention_workers=1, ffn_workers=1, micro_batches=num_micro_batches,
                    ffn_head_share=head_share)
    return LLM(model_dir, dtype="float32", device="cpu", num_threads=1, kv_cache_memory=1 << 30,
               afd=afd)


def run_split(llm: Any, prompts: list[list[int]], max_tokens: int,
              tag: str) -> tuple[float, float]:
    """Output tokens/s and mean TPOT (ms) of one workload on the split ``llm``, timed per
    request at the front."""
    from tessera import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}.{i}", prompt, params)
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
    tpot = [(last[r] - first[r]) * 1e3 / (count[r] - 1) for r in count if count[r] > 1]
    return sum(count.values()) / wall, sum(tpot) / len(tpot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=None, help="HF model dir (default: the ~100M Llama)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of calibration and split runs; the fastest run of each "
                             "workload is kept")
    parser.add_argument("--ffn-head-share", type=float, default=0.0, metavar="S",
                        help="share of the LM head on the FFN worker (measured and simulated)")
    parser.add_argument("--json", help="write the rows, the fitted profile and the latency here")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch

    from benchmarks.models import make_random_llama
    from benchmarks.simlab.afd_local import AFDLocalScenario, simulate_afd_local
    from benchmarks.simlab.gauge import GaugeLog, GaugeReading, gauge_report
    from benchmarks.simlab.plane_latency import measure_plane_latency_s
    from benchmarks.simlab.rounds import calibration_round, gauged_rounds
    from tessera.config import EngineConfig
    from tessera.engine.llm_engine import LLMEngine
    from tessera.model.loader import read_config
    from tessera.sim.calibrate import MachineGauge, measure
    from tessera.sim.engine_probe import fastest_rounds, fastest_runs, with_engine_facts
    from tessera.sim.engine_sim import EngineSimResult
    from tessera.sim.fit import fit_system, profile_with, step_errors
    from tessera.sim.hardware import System, system_at, system_from_profile
    from tessera.sim.model import costs_from_config

    model_dir = args.model or make_random_llama(".bench/models/llama-100m")
    model = costs_from_config(read_config(model_dir), name=model_dir)
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # each worker of the split has one thread
    profile = measure()
    kv_bytes = 4.0  # float32 cache
    rows_per_lane = max(1, args.num_requests // 2)
    latency_s = measure_plane_latency_s(model.hidden_size, rows_per_lane)
    engine = LLMEngine(EngineConfig(model=model_dir, dtype="float32", device="cpu",
                                    num_threads=1))
    engine.warm_up()
    splits = {m: open_split(model_dir, m, args.ffn_head_share) for m in (1, 2)}
    rng = random.Random(0)
    # Rounds, as in sim_local.py: the calibration workloads on the one-thread engine and one
    # run of the workload on each split, all kept warm, in a shuffled order; per workload the
    # fastest run counts. Fresh token ids each round, so no run reuses another's prefix cache.
    cal_rounds = []
    measured: dict[int, list[tuple[float, float]]] = {m: [] for m in splits}

    def measure_split(m: int, prompts: list[list[int]], r: int) -> None:
        measured[m].append(run_split(splits[m], prompts, args.max_tokens, f"{r}"))

    # A machine gauge between every two runs (as in sim_local.py): the machine each kept run
    # saw, and the errors of a fit and simulation rated at it.
    log = GaugeLog(MachineGauge())
    try:
        for r in range(max(args.rounds, 1)):
            prompts = [[rng.randrange(3, 500) for _ in range(args.prompt_len)]
                       for _ in range(args.num_requests)]
            cal_rounds.append(calibration_round(
                engine, model, kv_bytes, seed=1000 * r, order_seed=r,
                interleave=[functools.partial(measure_split, m, prompts, r) for m in splits],
                before_each=functools.partial(lambda r, t: log.mark((r, t)), r)))
        log.close()
    finally:
        for llm in splits.values():
            llm.close()
    samples = fastest_runs(gauged_rounds(cal_rounds, log))
    num_cal = len(cal_rounds[0])
    kept_cal = [log.around((r, k)) for k, r in enumerate(fastest_rounds(cal_rounds))]
    kept_val = {m: log.around((max(range(len(measured[m])), key=lambda r: measured[m][r]),
                               num_cal + i)) for i, m in enumerate(splits)}
    drift = gauge_report(kept_cal, list(kept_val.values()), log.readings())
    print(drift["line"])
    profile = with_engine_facts(profile, engine)
    ref_gauge: list[float] = profile["gauge"]  # type: ignore[assignment]
    # The result: the fit at the profile's fixed rates. Its peer from the same measurements:
    # every calibration step costed at the gauge reading around its run (simlab.gauge).
    plain = [replace(s, gauge=None) for s in samples]
    fitted = fit_system(system_from_profile(profile), model, "fp32", plain)
    gauged_fit = fit_system(system_from_profile(profile), model, "fp32", samples)
    gauged_system = system_from_profile(profile_with(profile, gauged_fit))
    profile = profile_with(profile, fitted)
    system = system_from_profile(profile)
    eff, host = system.chip.efficiency, system.host
    fit_err = sorted(abs(e) for e in step_errors(system, model, "fp32", plain))
    print(f"{args.rounds} rounds in {time.perf_counter() - t0:.0f} s; fit (1 thread) on "
          f"{len(samples)} steps, median step error {fit_err[len(fit_err) // 2]:.1%}; matmul "
          f"{eff.matmul:.2f}, memory {eff.memory:.2f}, kv memory "
          f"{eff.kv_memory or eff.memory:.2f} (fewer than {host.kv_whole_batch} seqs "
          f"{host.kv_memory_split or eff.kv_memory or eff.memory:.2f}), step "
          f"{eff.step_overhead_ms:.2f} ms, per op "
          f"{eff.op_overhead_us:.1f} us; data plane {latency_s * 1e6:.0f} us one way "
          f"({rows_per_lane} x {model.hidden_size} float32); gauge at the profile's rates "
          f"{ref_gauge[0]:.0f} GFLOP/s, {ref_gauge[1]:.1f} GB/s")

    def simulate(m: int, head_share: float, reading: GaugeReading | None = None,
                 fitted: System | None = None) -> EngineSimResult:
        """The split with M=``m`` simulated at the machine speed ``reading`` (None: the
        profile's rates), with ``fitted`` constants (default: the plain fit)."""
        at = system_at(fitted or system, reading)
        # Copies stream through the same memory as the weights: they follow the gauge's GB/s.
        copy_scale = 1.0 if reading is None else reading[1] / ref_gauge[1]
        return simulate_afd_local(AFDLocalScenario(
            system=at, model=model, precision="fp32",
            prompt_tokens=(args.prompt_len,) * args.num_requests,
            output_tokens=(args.max_tokens,) * args.num_requests,
            num_blocks=1 << 16, num_micro_batches=m, transfer_latency_s=latency_s,
            copy_bytes_per_s=profile["copy_gb_s"] * 1e9 / 2 * copy_scale,  # read plus write
            kv_bytes_per_element=kv_bytes, ffn_head_share=head_share))

    # What the simulator advises, from the calibration alone: the LM head share per M.
    shares = [i / 10 for i in range(11)]
    for m in (1, 2):
        sims = [simulate(m, share).output_tokens_per_s for share in shares]
        best = max(range(len(shares)), key=sims.__getitem__)
        print(f"simulated M={m}: best --ffn-head-share {shares[best]:g} ({sims[best]:.1f} tok/s;"
              f" share 0: {sims[0]:.1f})")
    rows = []
    worst = gauged_worst = 0.0
    for m in (1, 2):
        m_tps, m_tpot = max(measured[m])  # the fastest run
        sim = simulate(m, args.ffn_head_share)
        gauged = simulate(m, args.ffn_head_share, kept_val[m], gauged_system)
        s_tps, s_tpot = sim.output_tokens_per_s, sim.tpot_ms_mean
        err_tps, err_tpot = s_tps / m_tps - 1.0, s_tpot / m_tpot - 1.0
        gauged_errs = (gauged.output_tokens_per_s / m_tps - 1.0,
                       gauged.tpot_ms_mean / m_tpot - 1.0)
        worst = max(worst, abs(err_tps), abs(err_tpot))
        gauged_worst = max(gauged_worst, *map(abs, gauged_errs))
        head = f", head {args.ffn_head_share:g}" if args.ffn_head_share else ""
        rows.append((f"A=1 F=1 M={m}{head}, {args.num_requests} x {args.prompt_len} in / "
                     f"{args.max_tokens} out", m_tps, s_tps, err_tps, m_tpot, s_tpot, err_tpot,
                     kept_val[m][1], *gauged_errs))
    print(f"\n{'workload':<40} {'tok/s meas':>10} {'sim':>8} {'err':>7} "
          f"{'TPOT ms meas':>12} {'sim':>8} {'err':>7} {'gauge GB/s':>10} {'gauge-rated':>16}")
    for name, m_tps, s_tps, e1, m_tpot, s_tpot, e2, gb_s, g1, g2 in rows:
        print(f"{name:<40} {m_tps:>10.1f} {s_tps:>8.1f} {e1:>+7.1%} {m_tpot:>12.1f} "
              f"{s_tpot:>8.1f} {e2:>+7.1%} {gb_s:>10.1f} {g1:>+8.1%}{g2:>+8.1%}")
    print(f"{'calibration (median of its kept runs)':<40} {'':>57} {drift['calibration'][1]:>10.1f}")
    print(f"worst error {worst:.1%} (target {TOLERANCE:.0%}); gauge-rated "
          f"{gauged_worst:.1%}; {time.perf_counter() - t0:.0f} s")
    if args.json:
        # The calibration steps too, so that the fit can be studied offline without rerunning.
        steps = [dict(load=s.load.__dict__, seconds=s.seconds, gauge=s.gauge) for s in samples]
        Path(args.json).write_text(json.dumps(dict(
            rows=rows, profile=profile, transfer_latency_s=latency_s, fit_samples=steps,
            machine_gauge=drift, gauge_readings=log.readings()),
            indent=2))
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
