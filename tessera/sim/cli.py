"""Command line: ``tessera sim ...``, ``tessera sim calibrate ...`` and ``tessera plan ...``.

Both entry points take the arguments after the subcommand word and return an exit status;
bad input gives one line on stderr and status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .deployment import Deployment
from .errors import OneLineArgumentParser, SimError
from .simulator import Scenario, simulate
from .workload import Workload

_Parser = OneLineArgumentParser


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def sim_parser() -> argparse.ArgumentParser:
    """Argument parser of ``tessera sim``."""
    p = _Parser(prog="tessera sim", description="Simulate serving one model on one deployment.")
    p.add_argument("--hardware", required=True, help="system name (cloudmatrix384, gb200-nvl72, "
                   "dgx-h100, dgx-h800, dgx-h200, dgx-b200, cpu-local)")
    p.add_argument("--model", required=True, help="bundled model name or path to a config.json")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp8", "int8"])
    p.add_argument("--deployment", default="colocated", choices=["colocated", "pd", "afd"])
    i = _int
    p.add_argument("--dp", type=i, help="data-parallel attention groups (colocated/pd decode)")
    p.add_argument("--ep", type=i, help="expert-parallel ranks; must equal dp*tp (colocated/pd)")
    p.add_argument("--tp", type=i, default=1, help="devices per attention group (tensor parallel)")
    p.add_argument("--batch-per-dp", type=i, default=64, help="decode batch of one DP group")
    p.add_argument("--attention-devices", type=i, help="afd: attention devices (one DP group each)")
    p.add_argument("--ffn-devices", type=i, default=0, help="afd: expert (FFN) devices")
    p.add_argument("--micro-batches", type=i, default=None, help="ping-pong micro-batches")
    p.add_argument("--prefill-devices", type=i, default=0, help="pd/afd: prefill pool devices")
    p.add_argument("--prefill-instance-devices", type=i, default=0,
                   help="devices per prefill instance (default min(pool, 32))")
    p.add_argument("--decode-devices", type=i, help="pd: decode pool devices (sets --dp)")
    p.add_argument("--redundant-experts", type=i, default=None,
                   help="extra expert slots for load balancing (default 32 for MoE)")
    p.add_argument("--no-load-balancer", action="store_true", help="disable expert balancing")
    p.add_argument("--mtp-acceptance", type=_float, help="MTP draft acceptance rate (0..1)")
    p.add_argument("--input-tokens", type=i, required=True)
    p.add_argument("--output-tokens", type=i, required=True)
    p.add_argument("--kv-tokens", type=i, help="mean KV length of a decoding sequence")
    p.add_argument("--length-cv", type=_float, default=0.0, help="lognormal length spread (cv)")
    p.add_argument("--prefix-hit", type=_float, default=0.0, help="prompt share in prefix cache")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--request-rate", type=_float, help="Poisson arrivals per second")
    g.add_argument("--concurrency", type=i, help="closed loop: requests in flight")
    p.add_argument("--num-requests", type=i, default=None, help="requests to simulate")
    p.add_argument("--seed", type=i, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """Build the frozen :class:`Scenario` from parsed ``tessera sim`` arguments."""
    from .hardware import get_system
    from .model import load_model

    system = get_system(args.hardware)
    model = load_model(args.model)
    mode = args.deployment
    tp = args.tp
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
    if mode == "afd" and args.ep is not None and args.ep != args.ffn_devices:
        raise SimError(f"in afd the experts live on the FFN devices: --ep {args.ep} must equal"
                       f" --ffn-devices {args.ffn_devices}")
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
        num_requests = max(4 * (args.concurrency or dp * args.batch_per_dp), 200)
    if args.seed < 0:
        raise SimError("--seed must be non-negative")
    if redundant < 0:
        raise SimError("--redundant-experts must be non-negative")
    dep = Deployment(mode=mode, precision=args.precision, num_dp=dp, tp=tp,
                     batch_per_dp=args.batch_per_dp, num_ffn_devices=args.ffn_devices,
                     num_micro_batches=mb, num_prefill_devices=args.prefill_devices,
                     prefill_instance_devices=args.prefill_instance_devices,
                     mtp_acceptance=args.mtp_acceptance, load_balancer=not args.no_load_balancer,
                     num_redundant_experts=redundant)
    wl = Workload(num_requests=num_requests, input_tokens=args.input_tokens,
                  output_tokens=args.output_tokens, request_rate_per_s=args.request_rate,
                  concurrency=args.concurrency, length_cv=args.length_cv,
                  prefix_hit_fraction=args.prefix_hit, kv_tokens=args.kv_tokens)
    return Scenario(hardware=args.hardware, model=args.model, deployment=dep, workload=wl,
                    seed=args.seed)


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


def plan_main(argv: list[str]) -> int:
    """``tessera plan``: search deployments for the best tokens/s per chip under an SLO."""
    from .planner import plan_cli

    try:
        return plan_cli(argv)
    except SimError as exc:
        print(f"tessera plan: error: {exc}", file=sys.stderr)
        return 2
