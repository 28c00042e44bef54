"""Simulated vs measured: does ``tessera.sim`` predict Tessera's own runs on this machine?

In one run: measure the raw rates, then run rounds of the calibration workloads of
``tessera.sim.engine_probe`` and of validation workloads the fit never sees; fit the cost
model's constants to the calibration steps, and simulate the validation workloads with
``tessera.sim.engine_sim`` (the engine's own scheduler and block manager on a virtual clock).
Prints measured and simulated output throughput and mean TPOT with the error; target: every
error within 10%. Exit status 1 when one is not.

Other processes on a shared machine only ever slow a run down, in bursts and in drifts over
minutes. So every workload, calibration and validation alike, runs once per round
(``--rounds``; fresh random token ids of the same lengths, so the same schedule, and every run
checked to have taken no prompt token from the prefix cache: ``engine_probe.fresh_run``) and
its fastest whole run is kept; mixing the two kinds in each round, in a shuffled order
(``simlab.rounds``), lets both come from the machine's quiet stretches. One engine runs it
all. A ~50 ms machine gauge (``simlab.gauge``) is read before every run and every request group
of a serial case; the report gives its median at the kept calibration and validation runs and,
from the same measurements, the errors of a fit and simulation that cost every run at the
reading around it (``tessera.sim.hardware.system_at``). That correction is reported, not used
(benchmarks/RESULTS.md has why).

    python benchmarks/sim_local.py [--model DIR] [--threads 2] [--num-requests 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOLERANCE = 0.10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default=None, help="HF model dir (default: the ~100M Llama)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=32,
                        help="requests of the mixed validation workload")
    parser.add_argument("--omp-wait-policy", choices=["ACTIVE", "PASSIVE"], default=None)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of calibration and validation runs; the fastest run of "
                             "each workload is kept")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy

    from benchmarks.models import make_random_llama
    from benchmarks.peers import make_workload
    from benchmarks.simlab.gauge import GaugeLog, GaugeReading, gauge_report
    from benchmarks.simlab.rounds import calibration_round, gauged_rounds
    from tessera.config import CacheConfig, EngineConfig, SchedulerConfig
    from tessera.engine.llm_engine import LLMEngine
    from tessera.model.loader import read_config
    from tessera.sim.calibrate import MachineGauge, measure
    from tessera.sim.engine_probe import (
        CALIBRATION_RUNS,
        ProbeRun,
        StepSample,
        fastest_rounds,
        fastest_runs,
        fresh_run,
        record_steps,
        with_engine_facts,
    )
    from tessera.sim.engine_sim import (
        EngineScenario,
        EngineSimResult,
        StepCost,
        simulate_engine,
    )
    from tessera.sim.fit import fit_system, profile_with, step_errors
    from tessera.sim.hardware import System, system_at, system_from_profile
    from tessera.sim.model import costs_from_config

    model_dir = args.model or make_random_llama(".bench/models/llama-100m")
    model = costs_from_config(read_config(model_dir), name=model_dir)

    t0 = time.perf_counter()
    profile = measure()
    # One engine runs the calibration and every validation workload, as a user calibrates and
    # then predicts the engine they serve with. Separate engines, each with its own copy of the
    # weights, decoded batch 1 up to 20% apart on this machine at the same gauge reading (where
    # a fresh process's weights land in the host's memory differs, and no separate probe sees
    # it), so calibrating one and validating another compared two machines.
    eng = LLMEngine(EngineConfig(model=model_dir, dtype="float32", device="cpu",
                                 num_threads=args.threads,
                                 scheduler=SchedulerConfig(max_num_seqs=256),
                                 cache=CacheConfig(kv_cache_memory=4 << 30)))
    eng.warm_up()
    vocab = model.vocab_size
    mixed = make_workload(num_requests=args.num_requests, vocab_size=vocab, seed=1)
    # (name, requests in flight at most (None: all at once), requests, one at a time?)
    cases = [
        ("batch-1 decode (256 in / 128 out)", None,
         make_workload(3, 256, 256, 128, 128, vocab_size=vocab, seed=2), True),
        ("8 concurrent (64-512 in / 64 out)", 8,
         make_workload(16, 64, 512, 64, 64, vocab_size=vocab, seed=3), False),
        (f"mixed offline ({args.num_requests} req, 32-1024 in / 16-256 out)", None, mixed,
         False),
    ]
    kv_bytes = 4.0

    def groups_of(workload: list, serial: bool) -> list[list]:
        return [[req] for req in workload] if serial else [workload]

    tries: list[list[list[ProbeRun]]] = [  # [case][group] -> runs
        [[] for _ in groups_of(workload, serial)] for _, _, workload, serial in cases]

    def measure_case(i: int, r: int) -> None:
        _, in_flight, workload, serial = cases[i]
        for g, (group, group_tries) in enumerate(zip(groups_of(workload, serial), tries[i],
                                                     strict=True)):
            # Fresh token ids of the same lengths for every request of every case, group and
            # round: the same schedule, no prefix-cache hits. One stream per (round, case,
            # group): seeds once repeated across cases, so a case's first prompts began like
            # another case's and took its blocks from the prefix cache (fresh_run checks).
            rng = random.Random(f"sim_local validation {r} {i} {g}")
            prompts = [ids if r == 0 else [rng.randrange(vocab) for _ in ids] for ids, _ in group]
            # A reading before each group, so that each of a serial case's short runs is rated
            # at its own (the machine's state lasts some seconds to a minute).
            log.mark((r, len(CALIBRATION_RUNS) + i, g))
            group_tries.append(fresh_run(record_steps(eng, model, prompts, [n for _, n in group],
                                                      kv_bytes, max_in_flight=in_flight)))

    # Rounds: one run of every calibration and every validation workload, on the engine kept
    # warm, in a shuffled order. The machine's speed drifts over minutes (other tenants), so
    # calibrating first and measuring afterwards compares two different machines; mixed in
    # rounds, the fastest run of every workload comes from the machine's quiet stretches for
    # both.
    log = GaugeLog(MachineGauge())

    def mark_calibration(r: int, task: int) -> None:
        if task < len(CALIBRATION_RUNS):  # a validation case marks each of its groups
            log.mark((r, task))

    cal_rounds = [
        calibration_round(eng, model, kv_bytes, seed=1000 * r, order_seed=r,
                          interleave=[functools.partial(measure_case, i, r)
                                      for i in range(len(cases))],
                          before_each=functools.partial(mark_calibration, r))
        for r in range(max(args.rounds, 1))]
    log.close()
    # Every calibration step carries the reading around its run, for the gauge-rated fit that
    # the report prints beside the plain one.
    gauged_cal_rounds = gauged_rounds(cal_rounds, log)
    fit_samples = fastest_runs(gauged_cal_rounds)
    num_cal = len(cal_rounds[0])
    kept_cal = [log.around((r, k)) for k, r in enumerate(fastest_rounds(cal_rounds))]
    kept_by_case = [[log.around((min(range(len(t)), key=lambda r: t[r].wall_s), num_cal + i, g))
                     for g, t in enumerate(case_tries)] for i, case_tries in enumerate(tries)]
    kept_val = [g for case in kept_by_case for g in case]
    drift = gauge_report(kept_cal, kept_val, log.readings())
    drift["kept_calibration_runs"] = kept_cal  # in CALIBRATION_RUNS order
    print(drift["line"])
    profile = with_engine_facts(profile, eng)
    raw = system_from_profile(profile)

    def evaluate(samples: list[StepSample], readings: Sequence[Sequence[GaugeReading | None]],
                 ) -> tuple[System, float, list[dict[str, Any]], float]:
        """Fit on ``samples``, simulate every validation group at its reading: the fitted
        system, the median step error of the fit, a row per workload, the worst error."""
        system = system_from_profile(profile_with(profile, fit_system(raw, model, "fp32",
                                                                      samples)))
        fit_err = sorted(abs(e) for e in step_errors(system, model, "fp32", samples))
        rows = []
        worst = 0.0
        for (name, in_flight, workload, serial), case_tries, kept in zip(
                cases, tries, readings, strict=True):
            runs: list[tuple[ProbeRun, EngineSimResult]] = []
            steps = []
            for group, group_tries, reading in zip(groups_of(workload, serial), case_tries,
                                                   kept, strict=True):
                measured = min(group_tries, key=lambda run: run.wall_s)
                at = system_at(system, reading)  # the machine's speed during the kept run
                sim = simulate_engine(EngineScenario(
                    system=at, model=model, precision="fp32", kv_bytes_per_element=kv_bytes,
                    prompt_tokens=tuple(len(ids) for ids, _ in group),
                    output_tokens=tuple(n for _, n in group),
                    num_blocks=eng.runtime.num_kv_blocks, max_num_seqs=256,
                    concurrency=in_flight,
                    max_num_batched_tokens=eng.config.scheduler.max_num_batched_tokens))
                runs.append((measured, sim))
                # Each measured step with the fitted model's time for it: which steps a miss
                # comes from.
                step_cost = StepCost(at, model, "fp32")
                steps += [dict(load=st.load.__dict__, seconds=st.seconds,
                               simulated_seconds=step_cost.seconds(st.load), gauge=reading)
                          for st in measured.samples]
            m_tps = sum(m.num_output_tokens for m, _ in runs) / sum(m.wall_s for m, _ in runs)
            s_tps = sum(s.num_output_tokens for _, s in runs) / sum(s.duration_s for _, s in runs)
            m_tpot = sum(sum(m.tpot_ms) for m, _ in runs) / sum(len(m.tpot_ms) for m, _ in runs)
            s_tpot = sum(sum(s.tpot_ms) for _, s in runs) / sum(len(s.tpot_ms) for _, s in runs)
            err_tps, err_tpot = s_tps / m_tps - 1.0, s_tpot / m_tpot - 1.0
            worst = max(worst, abs(err_tps), abs(err_tpot))
            rows.append(dict(workload=name, measured_tok_s=m_tps, simulated_tok_s=s_tps,
                             tok_s_error=err_tps, measured_tpot_ms=m_tpot,
                             simulated_tpot_ms=s_tpot, tpot_error=err_tpot, steps=steps))
        return system, fit_err[len(fit_err) // 2], rows, worst

    ref_gauge: list[float] = profile["gauge"]  # type: ignore[assignment]
    # The result: the fit and the simulations at the profile's fixed rates.
    fitted, median_err, rows, worst = evaluate(
        [replace(s, gauge=None) for s in fit_samples], [[None] * len(k) for k in kept_by_case])
    eff, host = fitted.chip.efficiency, fitted.host
    # Its peer from the same measurements: every calibration step costed at the gauge reading
    # around its run and each validation run simulated at its own (simlab.gauge).
    _, gauged_median_err, gauged_rows, gauged_worst = evaluate(fit_samples, kept_by_case)
    print(f"{args.rounds} rounds in {time.perf_counter() - t0:.0f} s; fit on "
          f"{len(fit_samples)} steps, median step error {median_err:.1%}; matmul "
          f"{eff.matmul:.2f}, memory {eff.memory:.2f}, kv memory "
          f"{eff.kv_memory or eff.memory:.2f} (fewer than {host.kv_whole_batch} seqs "
          f"{host.kv_memory_split or eff.kv_memory or eff.memory:.2f}), attention "
          f"{eff.attention:.2f} (+{host.attention_row_us:.2f} us per prefill row), overlap "
          f"{eff.overlap:.2f}, step {eff.step_overhead_ms:.2f} ms, "
          f"per op "
          f"{eff.op_overhead_us:.1f} us, native decode rows {host.native_decode_rows}, per seq "
          f"{host.seq_overhead_us:.0f} us; machine: {profile['tflops']['fp32'] * 1e3:.0f} fp32 "
          f"GFLOPS, {profile['memory_gb_s']:.1f} GB/s weight streaming (gauge "
          f"{ref_gauge[0]:.0f} GFLOP/s, {ref_gauge[1]:.1f} GB/s), load average "
          f"{os.getloadavg()[0]:.1f}")

    # The gauge's weight-streaming GB/s around the kept run(s) of each workload, against the
    # calibration's median, and the errors of the gauge-rated fit and simulation.
    print(f"\n{'workload':<52} {'tok/s meas':>10} {'sim':>8} {'err':>7} "
          f"{'TPOT ms meas':>12} {'sim':>8} {'err':>7} {'gauge GB/s':>10} {'gauge-rated':>16}")
    for r, gauged, kept in zip(rows, gauged_rows, kept_by_case, strict=True):
        gb_s = sorted(g[1] for g in kept)[len(kept) // 2]
        print(f"{r['workload']:<52} {r['measured_tok_s']:>10.1f} {r['simulated_tok_s']:>8.1f} "
              f"{r['tok_s_error']:>+7.1%} {r['measured_tpot_ms']:>12.1f} "
              f"{r['simulated_tpot_ms']:>8.1f} {r['tpot_error']:>+7.1%} {gb_s:>10.1f} "
              f"{gauged['tok_s_error']:>+8.1%}{gauged['tpot_error']:>+8.1%}")
    print(f"{'calibration (median of its kept runs)':<52} {'':>57} {drift['calibration'][1]:>10.1f}")
    print(f"worst error {worst:.1%} (target {TOLERANCE:.0%}); gauge-rated {gauged_worst:.1%} "
          f"(fit median step error {gauged_median_err:.1%}); {time.perf_counter() - t0:.0f} s")
    if args.json:
        # The calibration steps too, so that the fit can be studied offline without rerunning;
        # each row holds its measured steps.
        steps = [dict(load=s.load.__dict__, seconds=s.seconds, gauge=s.gauge)
                 for s in fit_samples]
        Path(args.json).write_text(json.dumps(dict(
            rows=[{**r, "gauge_at_kept_runs": k} for r, k in zip(rows, kept_by_case, strict=True)],
            rows_gauge_rated=gauged_rows,
            calibration_rounds=[[[dict(load=st.load.__dict__, seconds=st.seconds, gauge=st.gauge)
                                  for st in run] for run in rnd]
                                for rnd in gauged_cal_rounds],
            efficiency=eff.__dict__, host=host.__dict__, profile=profile,
            fit_samples=steps, machine_gauge=drift, gauge_readings=log.readings()), indent=2))
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
