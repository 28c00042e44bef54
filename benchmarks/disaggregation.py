"""Prefill/decode disaggregation: steady decodes with bursts of long prompts, on a colocated
engine, on one prefill and one decode instance (1P1D), and on two data-parallel instances.

Workload (seeded): chat requests (``--chat-prompt-len`` prompt tokens, ``--chat-output-len``
generated) arrive at ``--chat-rate`` per second; every ``--burst-every`` seconds ``--burst-size``
long prompts (``--burst-prompt-len`` tokens, ``--burst-output-len`` generated) arrive at once.
Arrivals run for ``--duration`` seconds, then the engine drains. Compared, each a fresh engine
in its own process on the ~110M random Llama (float32), same threads in all:

- ``colocated``: one engine with 2 threads, chunked prefill (the peer: how a single server
  mixes long prefills into its decode steps);
- ``1P1D``: ``prefill_instances=1, decode_instances=1``, one thread each;
- ``data parallel 2``: ``data_parallel=2`` (KV-aware router), one thread each.

Reported: TTFT and TPOT (a request's mean time per output token after its first) p50/p99 for
the chat requests, and goodput: chat requests per second that met the SLO (TTFT at most
``--slo-ttft-s`` and TPOT at most ``--slo-tpot-ms``). With ``--predict``, the simulator
(calibrated on this machine and model, at one and at two threads: ``benchmarks/simlab/
instances.py``) predicts the same figures for the same arrivals, printed beside the measured
ones with the error; target: within 15%.

    python benchmarks/disaggregation.py [--duration 60] [--predict] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.offline_throughput import MODEL_DIR, isolated  # noqa: E402
from benchmarks.peers import FIRST_PLAIN_TOKEN_ID  # noqa: E402

Arrival = tuple[float, str, list[int], int]  # time s, kind, prompt ids, output tokens


def make_arrivals(args: argparse.Namespace) -> list[Arrival]:
    rng = random.Random(args.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(FIRST_PLAIN_TOKEN_ID, 32000) for _ in range(n)]

    out: list[Arrival] = []
    t = 0.0
    while True:
        t += rng.expovariate(args.chat_rate)
        if t >= args.duration:
            break
        out.append((t, "chat", tokens(args.chat_prompt_len), args.chat_output_len))
    burst_s = args.burst_every / 2
    while burst_s < args.duration:
        out += [(burst_s, "burst", tokens(args.burst_prompt_len), args.burst_output_len)
                for _ in range(args.burst_size)]
        burst_s += args.burst_every
    return sorted(out, key=lambda a: a[0])


def run(model_dir: str, arrivals: list[Arrival], options: dict[str, Any]) -> dict[str, Any]:
    from tessera import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu",
              max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, kv_cache_memory=KV_CACHE_BYTES,
              **options)
    engine = llm.engine
    llm.generate([[300] * 64], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    kinds: dict[str, str] = {}
    sent_s: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    start_s = time.perf_counter()
    pending = list(arrivals)
    while pending or engine.has_unfinished_requests():
        now_s = time.perf_counter() - start_s
        while pending and pending[0][0] <= now_s:
            at_s, kind, prompt, num_out = pending.pop(0)
            request_id = f"{kind}{len(kinds)}"
            kinds[request_id] = kind
            sent_s[request_id] = start_s + at_s
            engine.add_request(request_id, prompt, SamplingParams(
                temperature=0.0, max_tokens=num_out, ignore_eos=True))
        if not engine.has_unfinished_requests():
            time.sleep(min(0.01, max(0.0, pending[0][0] - now_s)))
            continue
        step = engine.step_with_deltas()
        t = time.perf_counter()
        for d in step.deltas:
            times.setdefault(d.request_id, []).append(t)
    wall_s = time.perf_counter() - start_s
    llm.close()
    rows = []
    for request_id, kind in kinds.items():
        ts = times.get(request_id, [])
        if kind != "chat" or not ts:
            continue
        ttft_s = ts[0] - sent_s[request_id]
        tpot_ms = 1000 * (ts[-1] - ts[0]) / max(1, len(ts) - 1)
        rows.append((ttft_s, tpot_ms))
    return {"rows": rows, "wall_s": wall_s}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


MAX_NUM_BATCHED_TOKENS = 512
KV_CACHE_BYTES = 1 << 30
ERROR_KEYS = ("ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms", "goodput_per_s")


def figures(r: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The report's figures of one run's chat rows (measured or simulated)."""
    ttft = [row[0] for row in r["rows"]]
    tpot = [row[1] for row in r["rows"]]
    good = sum(1 for a, b in r["rows"] if a <= args.slo_ttft_s and b <= args.slo_tpot_ms)
    return dict(ttft_p50_s=pct(ttft, 0.5), ttft_p99_s=pct(ttft, 0.99),
                tpot_p50_ms=statistics.median(tpot), tpot_p99_ms=pct(tpot, 0.99),
                goodput_per_s=good / r["wall_s"], num_good=good, num=len(r["rows"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--chat-rate", type=float, default=0.5, help="chat requests per second")
    p.add_argument("--chat-prompt-len", type=int, default=128)
    p.add_argument("--chat-output-len", type=int, default=96)
    p.add_argument("--burst-every", type=float, default=20.0)
    p.add_argument("--burst-size", type=int, default=2)
    p.add_argument("--burst-prompt-len", type=int, default=2048)
    p.add_argument("--burst-output-len", type=int, default=8)
    p.add_argument("--slo-ttft-s", type=float, default=5.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--predict", action="store_true",
                   help="also simulate each system (calibrates the simulator on first use)")
    p.add_argument("--recalibrate", action="store_true",
                   help="with --predict: calibrate again, not the kept profiles")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from benchmarks.models import make_random_llama

    model_dir = make_random_llama(str(MODEL_DIR))
    arrivals = make_arrivals(args)
    systems = [
        ("colocated, 2 threads", dict(num_threads=2)),
        ("1P1D, 1 thread each", dict(prefill_instances=1, decode_instances=1, num_threads=1)),
        ("data parallel 2, 1 thread each", dict(data_parallel=2, num_threads=1)),
    ]
    # The simulator's view of each: (threads per device, instance counts).
    simulated = {"colocated, 2 threads": (2, {}),
                 "1P1D, 1 thread each": (1, dict(num_prefill=1, num_decode=1)),
                 "data parallel 2, 1 thread each": (1, dict(num_instances=2))}
    num_chat = sum(1 for a in arrivals if a[1] == "chat")
    print(f"{args.duration:g} s of arrivals: {num_chat} chat requests ({args.chat_prompt_len} "
          f"+ {args.chat_output_len} tokens) at {args.chat_rate:g}/s, bursts of "
          f"{args.burst_size} x {args.burst_prompt_len}-token prompts every "
          f"{args.burst_every:g} s; SLO TTFT <= {args.slo_ttft_s:g} s, TPOT <= "
          f"{args.slo_tpot_ms:g} ms")
    results = {}
    for name, options in systems:
        print(f"  {name} ...", flush=True)
        r = isolated(run, model_dir, arrivals, options)
        if "error" in r:
            print(f"  {name}: failed: {r['error']}")
            return 1
        results[name] = r
    predicted = {}
    if args.predict:
        from benchmarks.simlab.instances import calibrated_profile, predict

        profiles = {t: calibrated_profile(model_dir, t, args.recalibrate) for t in (1, 2)}
        chat = [a[1] == "chat" for a in arrivals]
        for name, (threads, counts) in simulated.items():
            r = predict(profiles[threads], model_dir, [len(a[2]) for a in arrivals],
                        [a[3] for a in arrivals], [a[0] for a in arrivals],
                        MAX_NUM_BATCHED_TOKENS, KV_CACHE_BYTES, **counts)
            predicted[name] = {"rows": [row for row, c in zip(r["rows"], chat, strict=True)
                                        if c], "wall_s": r["wall_s"]}
    print(f"\n{'system':<32}{'TTFT p50 s':>11}{'TTFT p99 s':>11}{'TPOT p50 ms':>12}"
          f"{'TPOT p99 ms':>12}{'goodput/s':>10}")
    summary = {}
    for name, r in results.items():
        summary[name] = s = figures(r, args)
        print(f"{name:<32}{s['ttft_p50_s']:>11.2f}{s['ttft_p99_s']:>11.2f}"
              f"{s['tpot_p50_ms']:>12.1f}{s['tpot_p99_ms']:>12.1f}{s['goodput_per_s']:>10.3f}")
        if name in predicted:
            s["predicted"] = p = figures(predicted[name], args)
            print(f"{'  simulated':<32}{p['ttft_p50_s']:>11.2f}{p['ttft_p99_s']:>11.2f}"
                  f"{p['tpot_p50_ms']:>12.1f}{p['tpot_p99_ms']:>12.1f}"
                  f"{p['goodput_per_s']:>10.3f}")
            errors = {k: p[k] / s[k] - 1.0 for k in ERROR_KEYS if s[k] > 0}
            s["error"] = errors
            print(f"{'  error':<32}" + "".join(
                f"{100 * errors[k]:>+{w - 1}.0f}%" if k in errors else f"{'-':>{w}}"
                for k, w in zip(ERROR_KEYS, (11, 11, 12, 12, 10), strict=True)))
    co, pd = summary["colocated, 2 threads"], summary["1P1D, 1 thread each"]
    print(f"1P1D / colocated: TPOT p99 {pd['tpot_p99_ms'] / co['tpot_p99_ms']:.2f}x, goodput "
          f"{pd['goodput_per_s'] / max(co['goodput_per_s'], 1e-9):.2f}x "
          f"({pd['num_good']}/{pd['num']} vs {co['num_good']}/{co['num']} within the SLO)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
