"""Prefix caching: the same shared-prefix workload with Tessera's prefix cache on and off.

Workload: ``--num-prefixes`` system prompts of ``--prefix-tokens`` tokens; every request is one
of them plus a unique question of 32..96 tokens, and generates ``--output-tokens`` tokens. The
model is the ~110M random Llama of the offline benchmark (float32). Each setting runs in a
fresh process with the same threads. The peer here is Tessera itself with caching off: that is
what the cache must beat.

    python benchmarks/prefix_caching.py [--num-requests 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.offline_throughput import MODEL_DIR, isolated, set_wait_policy  # noqa: E402
from benchmarks.peers import FIRST_PLAIN_TOKEN_ID  # noqa: E402


def make_prefix_workload(
    num_requests: int, num_prefixes: int, prefix_tokens: int, seed: int
) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [
        [rng.randrange(FIRST_PLAIN_TOKEN_ID, 32000) for _ in range(prefix_tokens)]
        for _ in range(num_prefixes)
    ]
    return [
        rng.choice(prefixes)
        + [rng.randrange(FIRST_PLAIN_TOKEN_ID, 32000) for _ in range(rng.randint(32, 96))]
        for _ in range(num_requests)
    ]


def run(model_dir: str, prompts: list[list[int]], output_tokens: int, n_threads: int,
        prefix_caching: bool) -> dict[str, Any]:
    from tessera import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu", num_threads=n_threads,
              kv_cache_memory=4 << 30, enable_prefix_caching=prefix_caching)
    llm.generate([[300] * 16], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    start_s = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - start_s
    stats = llm.engine.stats()
    return {
        "wall_s": wall_s,
        "requests_per_s": len(prompts) / wall_s,
        "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outputs) / wall_s,
        "hit_rate": stats.num_prefix_hit_tokens_total / max(1, stats.num_prefix_queried_tokens_total),
        "token_ids": [o.outputs[0].token_ids for o in outputs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--num-prefixes", type=int, default=4)
    parser.add_argument("--prefix-tokens", type=int, default=768)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--omp-wait-policy", choices=["ACTIVE", "PASSIVE"], default=None)
    args = parser.parse_args(argv)
    set_wait_policy(args.omp_wait_policy)

    from benchmarks.models import make_random_llama

    model_dir = make_random_llama(str(MODEL_DIR))
    prompts = make_prefix_workload(args.num_requests, args.num_prefixes, args.prefix_tokens,
                                   args.seed)
    on = isolated(run, model_dir, prompts, args.output_tokens, args.threads, True)
    off = isolated(run, model_dir, prompts, args.output_tokens, args.threads, False)
    for name, r in (("on", on), ("off", off)):
        if "error" in r:
            print(f"prefix caching {name}: failed: {r['error']}")
            return 1
    same = on.pop("token_ids") == off.pop("token_ids")
    print(f"\n{len(prompts)} requests, {args.num_prefixes} shared prefixes of "
          f"{args.prefix_tokens} tokens, {args.output_tokens} output tokens; {args.threads} threads")
    print(f"{'prefix cache':<14}{'wall s':>9}{'req/s':>9}{'out tok/s':>11}{'hit rate':>10}")
    for name, r in (("on", on), ("off", off)):
        print(f"{name:<14}{r['wall_s']:>9.1f}{r['requests_per_s']:>9.2f}"
              f"{r['output_tokens_per_s']:>11.1f}{r['hit_rate']:>10.0%}")
    print(f"speed-up {off['wall_s'] / on['wall_s']:.2f}x; identical greedy outputs: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
