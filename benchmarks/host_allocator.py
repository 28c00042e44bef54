"""Prefill steps with glibc's default malloc settings vs Tessera's (freed large blocks kept).

Each setting runs in its own process (malloc settings are per process and cannot be undone):
the engine on a benchmark model, then ``--steps`` prefill steps of ``--num-prompts`` fresh
random prompts of ``--prompt-tokens`` each (one step each with the default 2048-token budget),
timing every step and counting the process's minor page faults during it. The "default" run
skips ``Platform.prepare_process`` (the glibc defaults); "kept" is what the engine does.

    python benchmarks/host_allocator.py [--model qwen3-moe] [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

SETTINGS = ("default", "kept")


def child(setting: str, model: str, steps: int, num_prompts: int, prompt_tokens: int,
          threads: int) -> dict[str, list[float]]:
    """Run the prefill steps in this process under ``setting``; per-step ms and faults."""
    from benchmarks.moe_throughput import MODELS, build
    from tessera import LLM, SamplingParams
    from tessera.platform.base import Platform

    if setting == "default":
        Platform.prepare_process = lambda self: None  # type: ignore[method-assign]
    model_dir = build(model) if model in MODELS else model
    llm = LLM(model_dir, dtype="float32", device="cpu", num_threads=threads,
              kv_cache_memory=1 << 30, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    rng = random.Random(0)
    vocab = llm.engine.spec.vocab_size
    step_ms: list[float] = []
    faults: list[float] = []
    for i in range(steps + 1):  # the first step warms up and is not counted
        prompts = [[rng.randrange(vocab) for _ in range(prompt_tokens)] for _ in range(num_prompts)]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        if i:
            step_ms.append((time.perf_counter() - t0) * 1e3)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"step_ms": step_ms, "faults": faults}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default="qwen3-moe",
                   help="a benchmarks/moe_throughput.py model name or an HF model directory")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.num_prompts < 1 or args.prompt_tokens < 1:
        p.error("--steps, --num-prompts and --prompt-tokens must be at least 1")
    if args.num_prompts * args.prompt_tokens > 2048:
        p.error("--num-prompts x --prompt-tokens must fit one 2048-token step")
    if args.child:
        print(json.dumps(child(args.child, args.model, args.steps, args.num_prompts,
                               args.prompt_tokens, args.threads)))
        return 0

    common = ["--model", args.model, "--steps", str(args.steps), "--num-prompts",
              str(args.num_prompts), "--prompt-tokens", str(args.prompt_tokens),
              "--threads", str(args.threads)]
    results = {}
    for setting in SETTINGS:
        proc = subprocess.run([sys.executable, __file__, "--child", setting, *common],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{setting} run failed: {tail}")
            return 1
        results[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
    tokens = args.num_prompts * args.prompt_tokens
    print(f"{args.model}: {args.steps} prefill steps of {tokens} tokens, {args.threads} threads")
    print(f"{'malloc':>8} {'median ms':>10} {'min ms':>8} {'max ms':>8} "
          f"{'median faults':>14} {'max faults':>11}")
    for setting, r in results.items():
        print(f"{setting:>8} {statistics.median(r['step_ms']):>10.0f} {min(r['step_ms']):>8.0f} "
              f"{max(r['step_ms']):>8.0f} {statistics.median(r['faults']):>14.0f} "
              f"{max(r['faults']):>11.0f}")
    speedup = statistics.median(results["default"]["step_ms"]) / statistics.median(
        results["kept"]["step_ms"])
    print(f"kept vs default: {speedup:.2f}x median step time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
