"""Command line: ``tessera sim ...``, ``tessera sim calibrate ...`` and ``tessera plan ...``.

Both entry points take the arguments after the subcommand word and return an exit status;
bad input gives one line on stderr and status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from typing import Any

from .deployment import Deployment
from .errors import OneLineArgumentParser, SimError
from .hardware import MAX_SYSTEMS
from .inputs import MAX_BATCH_PER_DP, MAX_REQUESTS, check_output_file, float_arg, int_arg
from .result import SimResult
from .simulator import Scenario, simulate
from .workload import Workload

_Parser = OneLineArgumentParser


def _add_hit_flags(p: argparse.ArgumentParser) -> None:
    """Prefix-cache and KV-tier hit shares and the tiers' sessions (``sim`` and ``plan``)."""
    share = float_arg(0.0, 1.0, max_open=True)
    p.add_argument("--prefix-hit", type=share, default=0.0, help="prompt share in prefix cache")
    for tier, where in (("host", "host DRAM"), ("ssd", "node-local SSD"),
                        ("remote", "a remote store across the fabric")):
        p.add_argument(f"--{tier}-hit", type=share, default=0.0,
                       help=f"prompt share loaded from the KV tier in {where}")
    p.add_argument("--sessions", type=int_arg(1), default=None,
                   help="sessions whose prefixes the KV tiers keep (default: requests in flight)")


def _with_hits(workload: Workload, args: argparse.Namespace) -> Workload:
    """``workload`` with the hit flags' shares and sessions."""
    return replace(workload, prefix_hit_fraction=args.prefix_hit,
                   host_hit_fraction=args.host_hit, ssd_hit_fraction=args.ssd_hit,
                   remote_hit_fraction=args.remote_hit, num_sessions=args.sessions)


def sim_parser() -> argparse.ArgumentParser:
    """Argument parser of ``tessera sim``."""
    p = _Parser(prog="tessera sim", description="Simulate serving one model on one deployment.")
    p.add_argument("--hardware", required=True, help="system name (cloudmatrix384, gb200-nvl72, "
                   "dgx-h100, dgx-h800, dgx-h200, dgx-b200, cpu-local)")
    p.add_argument("--model", required=True, help="bundled model name or path to a config.json")
    p.add_argument("--systems", type=int_arg(1, MAX_SYSTEMS), default=1,
                   help="systems like --hardware side by side; pools fill them in order (decode, "
                   "then prefill), and traffic between them takes the scale-out network")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp8", "int8"])
    p.add_argument("--deployment", default="colocated", choices=["colocated", "pd", "afd"])
    count = int_arg(1)  # device counts, sizes and lengths: 0 or less is always a mistake
    p.add_argument("--dp", type=count, help="data-parallel attention groups (colocated/pd decode)")
    p.add_argument("--ep", type=count, help="expert-parallel ranks; must equal dp*tp (colocated/pd)")
    p.add_argument("--tp", type=count, default=1, help="devices per attention group (tensor parallel)")
    p.add_argument("--batch-per-dp", type=int_arg(1, MAX_BATCH_PER_DP), default=64,
                   help="decode batch of one DP group")
    p.add_argument("--attention-devices", type=count,
                   help="afd: attention devices (one DP group each)")
    p.add_argument("--ffn-devices", type=count, help="afd: expert (FFN) devices")
    p.add_argument("--micro-batches", type=count, default=None, help="ping-pong micro-batches")
    p.add_argument("--prefill-devices", type=count, help="pd/afd: prefill pool devices")
    p.add_argument("--prefill-instance-devices", type=count,
                   help="devices per prefill instance (default min(pool, 32))")
    p.add_argument("--decode-devices", type=count, help="pd: decode pool devices (sets --dp)")
    p.add_argument("--redundant-experts", type=int_arg(0), default=None,
                   help="extra expert slots for load balancing (default 32 for MoE)")
    p.add_argument("--no-load-balancer", action="store_true", help="disable expert balancing")
    p.add_argument("--mtp-acceptance", type=float_arg(0.0, 1.0),
                   help="MTP draft acceptance rate (0..1)")
    p.add_argument("--input-tokens", type=count, required=True)
    p.add_argument("--output-tokens", type=count, required=True)
    p.add_argument("--kv-tokens", type=count, help="mean KV length of a decoding sequence")
    p.add_argument("--length-cv", type=float_arg(0.0), default=0.0,
                   help="lognormal length spread (cv)")
    _add_hit_flags(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--request-rate", type=float_arg(0.0, min_open=True),
                   help="Poisson arrivals per second")
    g.add_argument("--concurrency", type=count, help="closed loop: requests in flight")
    p.add_argument("--num-requests", type=int_arg(1, MAX_REQUESTS), default=None,
                   help="requests to simulate")
    p.add_argument("--seed", type=int_arg(0), default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """Build the frozen :class:`Scenario` from parsed ``tessera sim`` arguments."""
    from .hardware import get_system
    from .model import load_model

    system = get_system(args.hardware, args.systems)
    model = load_model(args.model)
    mode = args.deployment
    tp = args.tp
    ffn_devices = args.ffn_devices or 0  # 0: no FFN pool (colocated, pd)
    if mode == "afd":
        if not args.attention_devices:
            raise SimError("afd needs --attention-devices")
        if args.attention_devices % tp:
            raise SimError("--attention-devices must be a multiple of --tp")
        dp = args.attention_devices // tp
    elif mode == "pd" and args.decode_devices:
        if args.decode_devices % tp:
            raise SimError("--decode-devices must be a multiple of --tp")
        dp = args.decode_devices // tp
    else:
        dp = args.dp or max(system.num_devices // tp if mode == "colocated" else 0, 1)
    if mode == "afd" and args.ep is not None and args.ep != ffn_devices:
        raise SimError(f"in afd the experts live on the FFN devices: --ep {args.ep} must equal"
                       f" --ffn-devices {ffn_devices}")
    if mode != "afd" and args.ep is not None and model.is_moe and args.ep != dp * tp:
        raise SimError(f"--ep {args.ep} must equal the attention devices dp*tp = {dp * tp}")
    mb = args.micro_batches if args.micro_batches is not None else (2 if model.is_moe else 1)
    redundant = args.redundant_experts
    if redundant is None:
        redundant = 32 if model.is_moe else 0
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = dp * args.batch_per_dp
    num_requests = args.num_requests
    if num_requests is None:
        num_requests = min(max(4 * (args.concurrency or dp * args.batch_per_dp), 200),
                           MAX_REQUESTS)
    dep = Deployment(mode=mode, precision=args.precision, num_dp=dp, tp=tp,
                     batch_per_dp=args.batch_per_dp, num_ffn_devices=ffn_devices,
                     num_micro_batches=mb, num_prefill_devices=args.prefill_devices or 0,
                     prefill_instance_devices=args.prefill_instance_devices or 0,
                     mtp_acceptance=args.mtp_acceptance, load_balancer=not args.no_load_balancer,
                     num_redundant_experts=redundant)
    wl = _with_hits(Workload(num_requests=num_requests, input_tokens=args.input_tokens,
                             output_tokens=args.output_tokens,
                             request_rate_per_s=args.request_rate, concurrency=args.concurrency,
                             length_cv=args.length_cv, kv_tokens=args.kv_tokens), args)
    return Scenario(hardware=args.hardware, model=args.model, deployment=dep, workload=wl,
                    seed=args.seed, num_systems=args.systems)


def _print_result(res: object, as_json: bool) -> None:
    data = res.to_dict()  # type: ignore[attr-defined]
    if as_json:
        print(json.dumps(data))
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {text}")


def sim_main(argv: list[str]) -> int:
    """``tessera sim``: simulate one scenario (or ``calibrate`` this machine)."""
    try:
        if argv and argv[0] == "calibrate":
            from .calibrate import calibrate_main

            return calibrate_main(argv[1:])
        args = sim_parser().parse_args(argv)
        result = simulate(scenario_from_args(args))
    except SimError as exc:
        print(f"tessera sim: error: {exc}", file=sys.stderr)
        return 2
    _print_result(result, args.json)
    return 0


def _compare_spec(text: str) -> tuple[str, int]:
    """argparse type of ``--compare``: ``HARDWARE:CHIPS``."""
    name, _, chips = text.partition(":")
    if not name or not chips:
        raise argparse.ArgumentTypeError(f"want HARDWARE:CHIPS, got {text!r}")
    return name, int_arg(1)(chips)


def plan_parser() -> argparse.ArgumentParser:
    """Argument parser of ``tessera plan``."""
    p = _Parser(prog="tessera plan", description="Find the best deployments under an SLO.")
    count = int_arg(1)
    slo_ms = float_arg(0.0, min_open=True)
    p.add_argument("--hardware", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--chips", type=count, required=True, help="chips of all --systems")
    p.add_argument("--systems", type=int_arg(1, MAX_SYSTEMS), default=1,
                   help="systems like --hardware side by side (a prefill pool may fill one "
                   "and feed a decode pool on another)")
    p.add_argument("--tpot-slo-ms", type=slo_ms, required=True)
    p.add_argument("--ttft-slo-ms", type=slo_ms)
    p.add_argument("--input-tokens", type=count, required=True)
    p.add_argument("--output-tokens", type=count, required=True)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp8", "int8"])
    p.add_argument("--mtp-acceptance", type=float_arg(0.0, 1.0))
    p.add_argument("--top", type=count, default=5, help="rows to print")
    p.add_argument("--emit-deployment", metavar="FILE",
                   help="write the best deployment to FILE, which 'tessera serve MODEL "
                   "--deployment FILE' runs")
    _add_hit_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", help="write the throughput-latency frontier to this PNG")
    p.add_argument("--compare", type=_compare_spec, action="append", default=[],
                   metavar="HARDWARE:CHIPS",
                   help="add another system's frontier to the plot (repeatable)")
    return p


def plan_cli(argv: list[str]) -> int:
    """``tessera plan`` implementation (errors raise :class:`SimError`)."""
    from .hardware import get_system
    from .planner import check_chips, describe, plan

    a = plan_parser().parse_args(argv)
    # Everything that can fail is checked here, before a search that takes seconds to minutes.
    if a.emit_deployment is not None:
        check_output_file(a.emit_deployment, "--emit-deployment")
    if a.plot is not None:
        from .plot import check_plot_file

        check_plot_file(a.plot)
    elif a.compare:
        raise SimError("--compare adds to the --plot frontier: give --plot too")
    for name, chips in a.compare:
        try:
            check_chips(get_system(name), chips)
        except SimError as exc:
            raise SimError(f"--compare {name}:{chips}: {exc}") from exc
    hits = _with_hits(Workload(num_requests=1, input_tokens=a.input_tokens,
                               output_tokens=a.output_tokens, concurrency=1), a)
    best, feasible = plan(a.hardware, a.model, a.chips, a.tpot_slo_ms, a.ttft_slo_ms,
                          a.input_tokens, a.output_tokens, a.precision, a.mtp_acceptance, a.top,
                          hits=hits, num_systems=a.systems)
    if a.json:
        print(json.dumps({"num_feasible": len(feasible), "best": [
            {"deployment": describe(cand.deployment), "estimate": asdict(cand) | {
                "deployment": asdict(cand.deployment)},
             "simulated": None if res is None else res.to_dict()} for cand, res in best]}))
    else:
        _print_plan(a, best, len(feasible))
    if a.emit_deployment is not None:
        _emit(a, best)
    if a.plot is not None:
        from .plot import plot_frontier

        series = {f"{a.hardware} x{a.chips}": feasible}
        for name, chips in a.compare:
            _, other = plan(name, a.model, chips, a.tpot_slo_ms, None, a.input_tokens,
                            a.output_tokens, None, a.mtp_acceptance, top=0, verify=0)
            series[f"{name} x{chips}"] = other
        plot_frontier(series, a.plot, f"{a.model}, {a.input_tokens} in / {a.output_tokens} out",
                      a.tpot_slo_ms)
        print(f"plot written to {a.plot}")
    return 0


def _emit(a: argparse.Namespace, best: list[tuple[Any, SimResult | None]]) -> None:
    from tessera import deployment_file

    from .emit import deployment_file_of
    from .hardware import get_system

    if not best:
        raise SimError("no deployment meets the SLO: nothing written to --emit-deployment")
    cand, res = best[0]
    dep = deployment_file_of(
        cand.deployment, get_system(a.hardware, a.systems), a.model,
        deployment_file.Workload(input_tokens=a.input_tokens, output_tokens=a.output_tokens,
                                 tpot_slo_ms=a.tpot_slo_ms, ttft_slo_ms=a.ttft_slo_ms),
        cand.tokens_per_s_per_chip, cand.tpot_ms, cand.ttft_ms, res)
    try:
        deployment_file.write(dep, a.emit_deployment)
    except OSError as exc:
        raise SimError(f"cannot write {a.emit_deployment}: {exc.strerror or exc}") from exc
    # The json output stays one object: the note goes to stderr.
    print(f"deployment written to {a.emit_deployment} (run it: tessera serve MODEL "
          f"--deployment {a.emit_deployment})", file=sys.stderr if a.json else sys.stdout)


def _print_plan(a: argparse.Namespace, best: list[tuple[Any, SimResult | None]],
                num_feasible: int) -> None:
    from .planner import describe

    print(f"{num_feasible} feasible deployments; best under TPOT <= {a.tpot_slo_ms} ms"
          + (f", TTFT <= {a.ttft_slo_ms} ms" if a.ttft_slo_ms else ""))
    if not best:
        print("none meets the SLO")
    for cand, res in best:
        line = (f"{describe(cand.deployment):<55} {cand.tokens_per_s_per_chip:8.0f} tok/s/chip"
                f"  tpot {cand.tpot_ms:6.1f} ms  ttft {cand.ttft_ms:7.0f} ms")
        if res is not None:
            line += (f"  | simulated {res.tokens_per_s_per_chip:6.0f} tok/s/chip"
                     f" tpot p99 {res.tpot_ms_p99:6.1f} ms ttft p99 {res.ttft_ms_p99:7.0f} ms")
        print(line)
        if res is not None and res.tier_nodes:
            print(f"    kv tiers: {res.tier_sessions:.0f} sessions on {res.tier_nodes} nodes:"
                  f" host DRAM {res.host_tier_bytes_per_node / 1e9:.1f} GB/node,"
                  f" SSD {res.ssd_tier_bytes_per_node / 1e9:.1f} GB/node,"
                  f" remote store {res.remote_tier_bytes / 1e9:.1f} GB")


def plan_main(argv: list[str]) -> int:
    """``tessera plan``: search deployments for the best tokens/s per chip under an SLO."""
    try:
        return plan_cli(argv)
    except SimError as exc:
        print(f"tessera plan: error: {exc}", file=sys.stderr)
        return 2
