"""CPU cost of engine steps, measured so that a busy machine does not distort it.

Wall-clock throughput on a machine shared with other work swings by 2x between runs; CPU time
of the process does not (it counts only the cycles this process got), and neither does the
number of tensor ops a step dispatches. This script reports both, for:

* batch-1 decode: CPU ms per token and torch ops per token (one prompt, greedy);
* batched: CPU seconds for a small mixed prefill/decode workload, as tokens per CPU second.

With ``--profile`` it also prints the ops with the most self CPU time (torch.profiler).
Compare two trees by running this script from each, interleaved, several times.

    python benchmarks/step_cost.py [--threads 1] [--decode-tokens 64] [--profile]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MODEL_DIR = REPO_ROOT / ".bench" / "models" / "llama-100m"


def _ops_per_step(engine: Any, num_steps: int) -> tuple[float, list[tuple[str, float, int]]]:
    """Torch ops dispatched per engine step and the top ops by self CPU time (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(num_steps):
            engine.step()
    counts: Counter[str] = Counter()
    self_us: Counter[str] = Counter()
    for evt in prof.events():
        if evt.name.startswith("aten::") or evt.name.startswith("tessera"):
            counts[evt.name] += 1
            self_us[evt.name] += evt.self_cpu_time_total
    # Only top-level dispatches count toward "ops per step" (not ops called inside other ops).
    top_level = sum(
        1
        for evt in prof.events()
        if (evt.name.startswith("aten::") or evt.name.startswith("tessera"))
        and (evt.cpu_parent is None or not evt.cpu_parent.name.startswith(("aten::", "tessera")))
    )
    top = [
        (name, us / 1e3 / num_steps, counts[name] // num_steps)
        for name, us in self_us.most_common(15)
    ]
    return top_level / num_steps, top


def batch1(model_dir: str, threads: int, num_tokens: int, profile: bool,
           kv_cache_dtype: str) -> dict[str, Any]:
    from tessera import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu", num_threads=threads,
              kv_cache_memory=1 << 30, kv_cache_dtype=kv_cache_dtype)
    engine = llm.engine
    llm.generate([[300] * 16], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    engine.add_request("b1", list(range(300, 332)),
                       SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True))
    engine.step()  # prefill
    for _ in range(4):
        engine.step()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(num_tokens):
        engine.step()
    cpu_ms = (time.process_time() - cpu0) * 1e3 / num_tokens
    wall_ms = (time.perf_counter() - wall0) * 1e3 / num_tokens
    result: dict[str, Any] = {"cpu_ms_per_token": cpu_ms, "wall_ms_per_token": wall_ms}
    if profile:
        ops, top = _ops_per_step(engine, 8)
        result["ops_per_token"] = ops
        result["top_ops"] = top
    return result


def batched(model_dir: str, threads: int, num_requests: int, profile: bool,
            kv_cache_dtype: str, max_prompt_tokens: int = 512,
            max_output_tokens: int = 64) -> dict[str, Any]:
    from benchmarks.peers import make_workload
    from tessera import LLM, SamplingParams

    requests = make_workload(num_requests, max_prompt_tokens=max_prompt_tokens,
                             max_output_tokens=max_output_tokens, seed=0)
    llm = LLM(model_dir, dtype="float32", device="cpu", num_threads=threads,
              kv_cache_memory=2 << 30, kv_cache_dtype=kv_cache_dtype)
    llm.generate([[300] * 16], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params, use_tqdm=False)
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    num_in = sum(len(p) for p, _ in requests)
    result: dict[str, Any] = {
        "cpu_s": cpu_s,
        "wall_s": wall_s,
        "tokens_per_cpu_s": (num_in + num_out) / cpu_s,
        "output_tokens_per_cpu_s": num_out / cpu_s,
    }
    if profile:
        engine = llm.engine
        for i, (p, n) in enumerate(requests[:16]):
            engine.add_request(f"p{i}", p, SamplingParams(max_tokens=n, ignore_eos=True))
        ops, top = _ops_per_step(engine, 12)
        result["ops_per_step"] = ops
        result["top_ops"] = top
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=16, help="batched workload size")
    parser.add_argument("--max-prompt-tokens", type=int, default=512, help="batched workload")
    parser.add_argument("--max-output-tokens", type=int, default=64, help="batched workload")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--skip", choices=["batch1", "batched"], default=None)
    parser.add_argument("--profile", action="store_true", help="also count and time torch ops")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.models import make_random_llama

    torch.manual_seed(0)
    model_dir = make_random_llama(str(MODEL_DIR))
    out: dict[str, Any] = {}
    if args.skip != "batch1":
        out["batch1"] = batch1(model_dir, args.threads, args.decode_tokens, args.profile,
                               args.kv_cache_dtype)
    if args.skip != "batched":
        out["batched"] = batched(model_dir, args.threads, args.num_requests, args.profile,
                                 args.kv_cache_dtype, args.max_prompt_tokens,
                                 args.max_output_tokens)
    if args.json:
        print(json.dumps(out))
        return 0
    for name, r in out.items():
        print(f"{name}:")
        for key, value in r.items():
            if key == "top_ops":
                for op, ms, n in value:
                    print(f"    {op:<40}{ms:>9.3f} ms{n:>6} calls")
            else:
                print(f"  {key:<26}{value:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
