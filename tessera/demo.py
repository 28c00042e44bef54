"""The README's main command: generate with Tessera on the embedded default model.

Until the trained demo model ships, the default is a small random-weight Llama built on first
use (a few seconds, no download), so the output text is noise; what the demo shows is the
engine at work: a batch of mixed-length prompts through continuous batching, chunked prefill
and prefix caching, with the throughput it reached.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

DEMO_CONFIG: dict[str, Any] = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=688,
    vocab_size=258,
    max_position_embeddings=2048,
    bos_token_id=256,
    eos_token_id=257,
)


def demo_model_dir() -> Path:
    """Where the demo model lives: $TESSERA_CACHE/demo-llama (default ~/.cache/tessera)."""
    root = Path(os.environ.get("TESSERA_CACHE", Path.home() / ".cache" / "tessera"))
    return root / "demo-llama"


def ensure_demo_model() -> Path:
    from tessera.random_models import build_random_model, is_built

    out = demo_model_dir()
    if not is_built(out, **DEMO_CONFIG):
        print(f"building the demo model in {out} ...", file=sys.stderr)
        build_random_model("LlamaConfig", "LlamaForCausalLM", out, seed=0, **DEMO_CONFIG)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tessera.demo")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.max_tokens < 1:
        print("demo: --num-prompts and --max-tokens must be positive", file=sys.stderr)
        return 2

    from tessera import LLM, SamplingParams

    path = ensure_demo_model()
    llm = LLM(str(path), dtype="float32", num_threads=args.threads, max_num_batched_tokens=1024)
    system = "You are a helpful assistant. Answer briefly. "
    prompts = [f"{system}Question {i}: what is {i} + {2 * i}?" for i in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    start_s = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed_s = time.perf_counter() - start_s
    for out in outputs[:3]:
        print(f"prompt: {out.prompt!r}\n  -> {out.outputs[0].text!r}")
    num_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    stats = llm.engine.stats()
    hit_pct = 100.0 * stats["prefix_hit_tokens"] / max(1, stats["prefix_queried_tokens"])
    print(
        f"\n{len(outputs)} requests, {num_prompt} prompt + {num_out} generated tokens in "
        f"{elapsed_s:.2f} s: {num_out / elapsed_s:.0f} output tokens/s, "
        f"{(num_prompt + num_out) / elapsed_s:.0f} total tokens/s; "
        f"prefix cache hit {hit_pct:.0f}% of prompt tokens"
    )
    print("(random-weight demo model: the text is noise; the trained demo model comes with the server)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
