"""Data parallelism: two instances behind the KV-aware router against round-robin placement.

Workload: ``--groups`` tenants, each with a system prompt of ``--prefix-len`` tokens; every
round sends one request per tenant (its prompt plus a fresh ``--suffix-len``-token question,
``--output-len`` tokens generated), all at once and in a random order, and waits for them. Each
instance's KV pool holds about ``--pool-prefixes`` system prompts, fewer than there are
tenants, so an instance that sees every tenant keeps evicting and recomputing them, and one
that sees a fixed share of them keeps them. Compared, each a fresh engine in its own process
on the ~110M random Llama (float32):

- ``kv router``: ``data_parallel=2`` with ``router_policy="kv"``, one thread per instance;
- ``round robin``: the same with ``router_policy="round_robin"``, the peer (what a plain load
  balancer in front of two servers does);
- ``one engine``: a single engine with two threads and both instances' KV memory, as a
  reference.

Round 1 fills the caches and is not timed. Reported over the other rounds: throughput
(prompt and output tokens over the wall time), TTFT p50/p99, and the prefix-cache hit rate.

    python benchmarks/data_parallel.py [--groups 8] [--rounds 5] [--prefix-len 1024]
        [--suffix-len 64] [--output-len 32] [--pool-prefixes 4] [--json out.json]
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

BLOCK_SIZE = 16


def make_rounds(groups: int, rounds: int, prefix_len: int, suffix_len: int,
                seed: int) -> list[list[list[int]]]:
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(FIRST_PLAIN_TOKEN_ID, 32000) for _ in range(n)]

    prefixes = [tokens(prefix_len) for _ in range(groups)]
    out = []
    for _ in range(rounds):
        order = list(range(groups))
        rng.shuffle(order)
        out.append([prefixes[g] + tokens(suffix_len) for g in order])
    return out


def kv_bytes_per_token(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * heads * head_dim * 4  # K and V, float32


def run(model_dir: str, rounds: list[list[list[int]]], output_len: int, options: dict[str, Any],
        ) -> dict[str, Any]:
    from tessera import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu", **options)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ttfts_ms: list[float] = []
    num_tokens = 0
    wall_s = 0.0
    hits0 = queried0 = 0
    for r, prompts in enumerate(rounds):
        if r == 1:
            s = engine.stats()
            hits0, queried0 = s.num_prefix_hit_tokens_total, s.num_prefix_queried_tokens_total
        start_s = time.perf_counter()
        first: dict[str, float] = {}
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{r}.{i}", prompt, params)
        while engine.has_unfinished_requests():
            step = engine.step_with_deltas()
            now_s = time.perf_counter()
            for d in step.deltas:
                first.setdefault(d.request_id, now_s)
        if r == 0:
            continue  # fills the caches
        wall_s += time.perf_counter() - start_s
        ttfts_ms += [1000 * (t - start_s) for t in first.values()]
        num_tokens += sum(len(p) for p in prompts) + output_len * len(prompts)
    s = engine.stats()
    placed = list(getattr(engine, "router", None).num_placed) if hasattr(engine, "router") else []
    llm.close()
    q = sorted(ttfts_ms)
    return {
        "tokens_per_s": num_tokens / wall_s,
        "ttft_p50_ms": statistics.median(q),
        "ttft_p99_ms": q[min(len(q) - 1, int(0.99 * len(q)))],
        "hit_rate": (s.num_prefix_hit_tokens_total - hits0)
        / max(1, s.num_prefix_queried_tokens_total - queried0),
        "placed": placed,
        "wall_s": wall_s,
    }


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The workload's flags (shared with ``router_http.py``)."""
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--pool-prefixes", type=float, default=4.0,
                   help="system prompts one instance's KV pool holds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)


def pool_size(args: argparse.Namespace, model_dir: str) -> tuple[int, int]:
    """(tokens, bytes) of one instance's KV pool: the prefixes it should keep, plus the
    running requests' own tokens."""
    running = args.groups * (args.suffix_len + args.output_len + BLOCK_SIZE)
    pool_tokens = int(args.pool_prefixes * args.prefix_len) + running
    return pool_tokens, pool_tokens * kv_bytes_per_token(model_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(p)
    args = p.parse_args(argv)

    from benchmarks.models import make_random_llama

    model_dir = make_random_llama(str(MODEL_DIR))
    rounds = make_rounds(args.groups, args.rounds, args.prefix_len, args.suffix_len, args.seed)
    pool_tokens, pool_bytes = pool_size(args, model_dir)
    common = dict(max_num_batched_tokens=2048, block_size=BLOCK_SIZE)
    systems = [
        ("kv router, 2 x 1 thread", dict(data_parallel=2, router_policy="kv", num_threads=1,
                                         kv_cache_memory=pool_bytes, **common)),
        ("round robin, 2 x 1 thread", dict(data_parallel=2, router_policy="round_robin",
                                           num_threads=1, kv_cache_memory=pool_bytes,
                                           **common)),
        ("one engine, 2 threads", dict(num_threads=2, kv_cache_memory=2 * pool_bytes,
                                       **common)),
    ]
    print(f"{args.groups} tenants x {args.rounds} rounds (first untimed), system prompts of "
          f"{args.prefix_len} tokens + {args.suffix_len}-token questions, {args.output_len} "
          f"output tokens; KV pool per instance {pool_tokens} tokens "
          f"({pool_bytes / 2**20:.0f} MiB, {args.pool_prefixes:g} system prompts + running)")
    rows = []
    for name, options in systems:
        print(f"  {name} ...", flush=True)
        r = isolated(run, model_dir, rounds, args.output_len, options)
        if "error" in r:
            print(f"  {name}: failed: {r['error']}")
            return 1
        rows.append((name, r))
    print(f"\n{'system':<28}{'tok/s':>8}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}"
          f"{'prefix hit':>12}  placed")
    for name, r in rows:
        print(f"{name:<28}{r['tokens_per_s']:>8.0f}{r['ttft_p50_ms']:>13.0f}"
              f"{r['ttft_p99_ms']:>13.0f}{r['hit_rate']:>12.0%}  {r['placed'] or '-'}")
    kv, rr = rows[0][1], rows[1][1]
    print(f"kv router / round robin: throughput {kv['tokens_per_s'] / rr['tokens_per_s']:.2f}x, "
          f"TTFT p50 {rr['ttft_p50_ms'] / kv['ttft_p50_ms']:.2f}x lower")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
