"""Transformerless (attention/FFN disaggregated) serving vs the single-process engine.

One model (the ~100M dense Llama, or with ``--moe`` a random Mixtral: 8 experts, top-2), one
workload, three runs: the single-process engine (``--threads`` threads), then
one attention worker and one FFN worker (one thread each) with 1 and with 2 micro-batches.
Reported per run: overall tokens/s, decode tokens/s (steps after every request has started:
tokens over their time, timed on the attention worker for the disaggregated runs), mean step
time, and for the disaggregated runs the fraction of FFN transfer time hidden behind attention
compute (from the trace: 1 - blocked / in flight) and the share of FFN requests computed in
one batch with others that had queued (``batched``; with ``--attention-workers A`` > 1).

    python benchmarks/transformerless.py [--num-requests N] [--max-tokens 64] [--json out.json]
    python benchmarks/transformerless.py --rounds 3   # three interleaved rounds, medians
    python benchmarks/transformerless.py --moe    # the same for a MoE model (256 requests)
    python benchmarks/transformerless.py --tiny [--moe]   # a smoke run on a tiny model
    python benchmarks/transformerless.py --data-plane torch   # the split over gloo instead
    python benchmarks/transformerless.py --attention-workers 2   # A=2 F=1 (sharing the cores)

Targets on a quiet machine: M=2 at least 1.4x the tokens/s of M=1, and at least 0.85x the
single-process engine.

With ``--rounds N`` the three runs repeat N times, interleaved (single, M=1, M=2, single, ...),
and a summary gives the median of each column and of each round's ratios. Why: on a shared
host one run's figures move by 10% or more from minute to minute, and the two split workers
lose more to a noisy neighbour than one two-thread process does; interleaving exposes every
configuration to the same spells of noise, and a round's ratio compares runs a minute apart.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MODEL_DIR = REPO_ROOT / ".bench" / "models" / "llama-100m"


def run_engine(llm: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    """Drive the engine step by step; decode steps are those after every request started."""
    from tessera import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    started: set[str] = set()
    start = time.perf_counter()
    decode_s = 0.0
    num_decode_tokens = 0
    num_steps = 0
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        all_started = len(started) == len(prompts)
        step = engine.step_with_deltas()
        num_steps += 1
        if all_started:
            decode_s += time.perf_counter() - t0
            num_decode_tokens += len(step.deltas)
        started.update(d.request_id for d in step.deltas)
    wall_s = time.perf_counter() - start
    return {
        "wall_s": wall_s,
        "tokens_per_s": len(prompts) * max_tokens / wall_s,
        "decode_tokens_per_s": num_decode_tokens / decode_s if decode_s > 0 else 0.0,
        "step_ms": 1000 * wall_s / max(num_steps, 1),
    }


def union_us(spans: list[tuple[float, float]]) -> float:
    """Total time covered by ``spans`` (start, end), overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def single(model_dir: str, prompts: list[list[int]], max_tokens: int, threads: int) -> dict:
    from tessera import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu", num_threads=threads,
              kv_cache_memory=1 << 30)
    llm.generate([[5] * 8], SamplingParams(max_tokens=2), use_tqdm=False)  # warm up
    return {"name": f"single process ({threads} threads)", **run_engine(llm, prompts, max_tokens)}


def disaggregated(model_dir: str, prompts: list[list[int]], max_tokens: int,
                  num_micro_batches: int, data_plane: str, head_share: float,
                  num_attention: int = 1) -> dict:
    from tessera import LLM
    from tessera.afd.trace import hidden_transfer_fraction
    from tessera.config import AFDConfig

    trace = Path(tempfile.mkdtemp()) / f"afd-m{num_micro_batches}.json"
    afd = AFDConfig(attention_workers=num_attention, ffn_workers=1,
                    micro_batches=num_micro_batches,
                    data_plane=data_plane, ffn_head_share=head_share, trace_path=str(trace))
    llm = LLM(model_dir, dtype="float32", device="cpu", num_threads=1, kv_cache_memory=1 << 30,
              afd=afd)
    try:
        result = run_engine(llm, prompts, max_tokens)
    finally:
        llm.close()
    events = json.loads(trace.read_text())["traceEvents"]
    # The front receives step reports in bursts, so time decode steps where they ran: on the
    # attention worker (a decode-only step schedules one token per sequence).
    # Lanes (micro-batches) step on their own, so their step spans overlap: decode time is
    # the union of the decode steps' spans, and a step is one lane's (the time between two
    # tokens of a sequence).
    # As for the single process, decode steps are those after every request started: after
    # the end of the last step with prompt tokens. (A lane's decode step that overlaps the
    # other lane's prefill would otherwise count the prefill's time as decode time.)
    steps = [e for e in events if e.get("cat") == "step"]
    prefill_end = max((e["ts"] + e["dur"] for e in steps
                       if e["args"].get("tokens") != e["args"].get("seqs")), default=0)
    decode = [e for e in steps if e["args"].get("tokens") == e["args"].get("seqs")
              and e["ts"] >= prefill_end]
    decode_us = union_us([(e["ts"], e["ts"] + e["dur"]) for e in decode])
    return {
        "name": f"A={num_attention} F=1 M={num_micro_batches} (1 thread each)"
                + ("" if data_plane == "auto" else f", {data_plane}")
                + (f", head {head_share:g}" if head_share else ""),
        **result,
        "decode_tokens_per_s": (
            sum(e["args"]["seqs"] for e in decode) / (decode_us / 1e6) if decode_us else 0.0
        ),
        "step_ms": sum(e["dur"] for e in steps) / max(len(steps), 1) / 1000,
        "hidden_transfer_fraction": hidden_transfer_fraction(events),
        # Requests the FFN worker computed together with others queued (see ffn_worker.serve).
        "ffn_batched_fraction": batched_fraction(events),
        "trace": str(trace),
    }


def batched_fraction(events: list[dict]) -> float | None:
    """Share of the FFN worker's requests computed in a batch with other queued requests."""
    recvs = [e for e in events if e.get("cat") == "recv"]
    if not recvs:
        return None
    return sum(e["args"].get("batched", 1) > 1 for e in recvs) / len(recvs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the ~100M Llama)")
    p.add_argument("--num-requests", type=int, default=None,
                   help="concurrent requests (default 64 dense, 256 with --moe: see below)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="threads of the single-process run")
    p.add_argument("--moe", action="store_true",
                   help="a random Mixtral (8 experts, top-2) instead of the dense Llama")
    p.add_argument("--tiny", action="store_true", help="tiny model and workload (smoke run)")
    p.add_argument("--data-plane", default="auto", choices=("auto", "torch", "shm"),
                   help="data plane of the split runs (auto: shared memory on this host)")
    p.add_argument("--ffn-head-share", type=float, default=0.0, metavar="S",
                   help="share of the LM head on the FFN worker in the split runs (default 0)")
    p.add_argument("--attention-workers", type=int, default=1, metavar="A",
                   help="attention workers of the split runs (default 1; each one thread, "
                        "so A > 1 shares the cores)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the three runs this many times, interleaved; print medians")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    for flag, value in (("--num-requests", args.num_requests),
                        ("--attention-workers", args.attention_workers)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from benchmarks.models import make_random_llama, make_random_model

    if args.tiny:
        tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                    max_position_embeddings=512)
        if args.moe:
            model_dir = make_random_model(
                "mixtral", str(REPO_ROOT / ".bench" / "models" / "mixtral-tiny"), **tiny,
                num_local_experts=4, num_experts_per_tok=2)
        else:
            model_dir = make_random_model(
                "llama", str(REPO_ROOT / ".bench" / "models" / "llama-tiny"), **tiny)
        args.num_requests, args.prompt_len, args.max_tokens = 4, 8, 8
    elif args.moe:
        # Four times the dense run's requests, so that a lane gives each expert as many rows
        # (32: 128 tokens x top-2 / 8 experts) as it gives each dense matrix at 64 requests.
        # A lane re-reads every weight it uses; with 8 rows per expert (64 requests) the
        # experts' weight reads bound the FFN side and M=2 barely beats M=1 (RESULTS.md).
        if args.num_requests is None:
            args.num_requests = 256
        model_dir = args.model or make_random_model(
            "mixtral", str(REPO_ROOT / ".bench" / "models" / "mixtral-afd"))
    else:
        model_dir = args.model or str(MODEL_DIR)
        if args.model is None:
            make_random_llama(model_dir)
    if args.num_requests is None:
        args.num_requests = 64
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(args.prompt_len)]
               for _ in range(args.num_requests)]
    rounds: list[list[dict]] = []
    for _ in range(max(args.rounds, 1)):
        runs = [single(model_dir, prompts, args.max_tokens, args.threads)] + [
            disaggregated(model_dir, prompts, args.max_tokens, m, args.data_plane,
                          args.ffn_head_share, args.attention_workers)
            for m in (1, 2)
        ]
        print_runs(runs, targets=args.attention_workers == 1)
        rounds.append(runs)
    if len(rounds) > 1:
        print_summary(rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(rounds if len(rounds) > 1 else rounds[0],
                                              indent=2))


def ratios(runs: list[dict]) -> tuple[float, float] | None:
    """(M=2 / M=1, M=2 / single) decode tokens/s of one round; None if a run timed nothing."""
    base, m1, m2 = (r["decode_tokens_per_s"] for r in runs)
    return (m2 / m1, m2 / base) if m1 > 0 and base > 0 else None


def print_runs(runs: list[dict], targets: bool = True) -> None:
    print(f"{'run':40} {'tok/s':>8} {'decode tok/s':>12} {'step ms':>9} {'hidden':>7} "
          f"{'batched':>7}")
    for r in runs:
        hidden, batched = r.get("hidden_transfer_fraction"), r.get("ffn_batched_fraction")
        print(f"{r['name']:40} {r['tokens_per_s']:8.1f} {r['decode_tokens_per_s']:12.1f} "
              f"{r['step_ms']:9.2f} {'' if hidden is None else f'{hidden:7.0%}'} "
              f"{'' if batched is None else f'{batched:7.0%}'}")
    pair = ratios(runs)
    if pair is not None:
        # The targets are for A=1 F=1, a core per worker.
        print(f"M=2 / M=1: {pair[0]:.2f}x" + (" (target >= 1.4x)" if targets else "")
              + f"; M=2 / single: {pair[1]:.2f}x" + (" (target >= 0.85x)" if targets else ""),
              flush=True)


def print_summary(rounds: list[list[dict]]) -> None:
    """Medians over the rounds: each run's decode tokens/s, and each round's two ratios."""
    print(f"median of {len(rounds)} rounds (decode tok/s; ratios within each round):")
    for i, name in enumerate(r["name"] for r in rounds[0]):
        values = [runs[i]["decode_tokens_per_s"] for runs in rounds]
        print(f"  {name:40} {statistics.median(values):8.1f}   "
              f"(min {min(values):.1f}, max {max(values):.1f})")
    pairs = [p for p in map(ratios, rounds) if p is not None]
    if pairs:
        by_m1, by_single = ([p[i] for p in pairs] for i in (0, 1))
        print(f"  M=2 / M=1: median {statistics.median(by_m1):.2f}x "
              f"(rounds: {', '.join(f'{x:.2f}' for x in by_m1)}; target >= 1.4x)")
        print(f"  M=2 / single: median {statistics.median(by_single):.2f}x "
              f"(rounds: {', '.join(f'{x:.2f}' for x in by_single)}; target >= 0.85x)")


if __name__ == "__main__":
    main()
