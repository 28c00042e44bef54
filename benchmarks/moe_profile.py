"""CPU time per engine step of a model, split by unit class (attention, dense FFN, MoE FFN).

Measures process CPU time (``time.process_time``), not wall time, so the figures stay
comparable on a machine shared with other work; compare two trees by running this script
from each, interleaved, a few times. Scenarios:

- ``b1``: batch-1 decode after a 32-token prompt;
- ``b64``: 64 sequences decoding together, prompts of 100..163 tokens;
- ``b64mix``: 64 sequences decoding together, prompts of 32..1000 tokens (mixed lengths);
- ``prefill``: one step prefilling 4 prompts of 500 tokens.

    python benchmarks/moe_profile.py .bench/models/deepseek-v3-bench [--scenarios b1,b64mix]
        [--steps 20] [--threads 2] [--ops]

``--ops`` adds torch.profiler's self-CPU table of the measured steps.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SCENARIOS = ("b1", "b64", "b64mix", "prefill")


def _prompt(seed: int, num_tokens: int) -> list[int]:
    return [300 + (seed * 7 + j) % 3000 for j in range(num_tokens)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("model_dir")
    parser.add_argument("--scenarios", default="b1,b64,prefill",
                        help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--steps", type=int, default=20, help="decode steps measured")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ops", action="store_true", help="print the per-op profile too")
    args = parser.parse_args(argv)
    names = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}")

    import torch

    from tessera import LLM, SamplingParams

    llm = LLM(args.model_dir, dtype="float32", device="cpu", num_threads=args.threads,
              kv_cache_memory=1 << 30, max_num_batched_tokens=2048)
    engine = llm.engine
    unit_cpu_s: collections.Counter[str] = collections.Counter()
    started: dict[int, float] = {}

    def before(module: torch.nn.Module, _args: Any) -> None:
        started[id(module)] = time.process_time()

    def after(module: torch.nn.Module, _args: Any, _out: Any) -> None:
        unit_cpu_s[type(module).__name__] += time.process_time() - started.pop(id(module))

    for unit in engine.runner.model.units():
        unit.register_forward_pre_hook(before)
        unit.register_forward_hook(after)
    llm.generate([[300] * 16], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)

    def params(max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def finish_prefills() -> None:
        sched = engine.scheduler
        while sched.waiting or any(
            s.num_computed_tokens < s.num_prompt_tokens for s in sched.running
        ):
            engine.step()

    def add_batch(lengths: list[int]) -> None:
        for i, n in enumerate(lengths):
            engine.add_request(f"r{i}", _prompt(i, n), params(args.steps + 3))
        finish_prefills()

    def add_prefills() -> None:
        for i in range(4):
            engine.add_request(f"p{i}", _prompt(i, 500), params(1))

    setups: dict[str, tuple[str, Callable[[], None], int]] = {
        "b1": ("batch-1 decode", lambda: add_batch([32]), args.steps),
        "b64": ("batch-64 decode, prompts 100..163",
                lambda: add_batch([100 + i for i in range(64)]), args.steps),
        "b64mix": ("batch-64 decode, prompts 32..1000",
                   lambda: add_batch([32 + (i * 61) % 1000 for i in range(64)]), args.steps),
        "prefill": ("prefill 4 x 500 tokens", add_prefills, 1),
    }
    for name in names:
        title, setup, num_steps = setups[name]
        setup()
        unit_cpu_s.clear()
        step_cpu_s: list[float] = []
        profiler = torch.profiler.profile() if args.ops else None
        if profiler is not None:
            profiler.__enter__()
        while len(step_cpu_s) < num_steps and engine.has_unfinished_requests():
            start_s = time.process_time()
            engine.step()
            step_cpu_s.append(time.process_time() - start_s)
        if profiler is not None:
            profiler.__exit__(None, None, None)
        measured = dict(unit_cpu_s)
        while engine.has_unfinished_requests():
            engine.step()
        total_s = sum(step_cpu_s)
        median_ms = sorted(step_cpu_s)[len(step_cpu_s) // 2] * 1e3
        print(f"== {title}: {len(step_cpu_s)} steps, median {median_ms:.2f} ms CPU/step")
        for unit_name, cpu_s in sorted(measured.items(), key=lambda kv: -kv[1]):
            print(f"   {unit_name:<22}{cpu_s * 1e3 / len(step_cpu_s):9.2f} ms CPU/step"
                  f" ({100 * cpu_s / total_s:.0f}%)")
        if profiler is not None:
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
