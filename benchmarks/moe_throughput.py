"""MoE offline throughput: Tessera vs transformers ``generate`` vs llama.cpp on MoE models.

Models (random weights, float32, vocab 32000, built offline by ``benchmarks/models.py``):

- ``mixtral``: hidden 512, 8 layers, 8 experts of intermediate 1024, top-2 (~142M params,
  ~66M active per token, embedding and LM head included).
- ``qwen3-moe``: hidden 512, 8 layers, 16 experts of intermediate 256, top-4, q/k norm
  (~89M params, ~52M active).
- ``qwen2-moe``: as qwen3-moe plus a gated shared expert of intermediate 512 (~98M params).
- ``deepseek-v3``: MLA attention, 1 dense + 7 MoE layers, 16 routed experts in 4 groups
  (top-2 groups, top-4 experts, sigmoid + score bias), 1 shared expert.

Workload: the same shape as ``offline_throughput.py`` (``make_workload``: prompts of 32..1024
tokens, outputs of 16..256, EOS ignored), each engine in a fresh process with the same threads
and OpenMP wait policy. Peers: transformers ``generate`` (static left-padded batches) and
llama.cpp (llama-cpp-python, continuous batching; the model is converted to an f32 GGUF with
llama.cpp's own converter, which handles all four models, DeepSeek-V3 included). A peer that
cannot run a model is reported as skipped.

    python benchmarks/moe_throughput.py [--models mixtral,qwen3-moe,deepseek-v3] [--num-requests 64]
        [--threads 2] [--peers hf,llamacpp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.offline_throughput import (  # noqa: E402
    hf_batched,
    isolated,
    llamacpp_batch1,
    llamacpp_batched,
    set_wait_policy,
    tessera_batch1,
    tessera_batched,
)
from benchmarks.peers import make_workload  # noqa: E402

MODELS_DIR = REPO_ROOT / ".bench" / "models"

# name -> (HF model_type, config overrides on benchmarks/models.py's ARCH_DEFAULTS)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("mixtral", {}),
    "qwen2-moe": ("qwen2_moe", {}),
    "qwen3-moe": ("qwen3_moe", {}),
    "deepseek-v3": (
        "deepseek_v3",
        dict(
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            intermediate_size=1024,
            moe_intermediate_size=256,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            kv_lora_rank=128,
            q_lora_rank=256,
            qk_rope_head_dim=32,
            qk_nope_head_dim=64,
            v_head_dim=64,
            head_dim=32,
        ),
    ),
}
DEFAULT_MODELS = "mixtral,qwen3-moe,deepseek-v3"


def build(name: str) -> str:
    """Build (or reuse) benchmark model ``name`` under ``.bench/models/``; returns its dir."""
    from benchmarks.models import make_random_model

    model_type, overrides = MODELS[name]
    return make_random_model(model_type, str(MODELS_DIR / f"{name}-bench"), **overrides)


def _print_table(title: str, results: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}")
    base = results["tessera"].get("output_tokens_per_s")
    print(f"{'engine':<14}{'output tok/s':>14}{'total tok/s':>14}{'wall s':>10}"
          f"{'cpu share':>11}{'Tessera x':>11}")
    for engine, r in results.items():
        if "error" in r:
            print(f"{engine:<14}  skipped: {r['error']}")
            continue
        ratio = base / r["output_tokens_per_s"] if base else float("nan")
        print(f"{engine:<14}{r['output_tokens_per_s']:>14.1f}{r['total_tokens_per_s']:>14.1f}"
              f"{r['wall_s']:>10.1f}{r.get('cpu_share', float('nan')):>11.2f}{ratio:>11.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-output-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=32, help="llama.cpp parallel slots")
    parser.add_argument("--peers", default="hf,llamacpp",
                        help="comma list of hf, llamacpp; or 'none'")
    parser.add_argument("--no-batch1", action="store_true", help="skip batch-1 decode runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write all results to this file")
    parser.add_argument("--omp-wait-policy", choices=["ACTIVE", "PASSIVE"], default=None,
                        help="OpenMP wait policy for every engine (default: leave unset)")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    set_wait_policy(args.omp_wait_policy)
    requests = make_workload(args.num_requests, seed=args.seed,
                             max_prompt_tokens=args.max_prompt_tokens,
                             max_output_tokens=args.max_output_tokens)
    peers = set() if args.peers == "none" else set(args.peers.split(","))
    t = args.threads
    num_prompt = sum(len(p) for p, _ in requests)
    num_out = sum(n for _, n in requests)
    policy = args.omp_wait_policy or "default"
    print(f"workload: {len(requests)} requests, {num_prompt} prompt + {num_out} output tokens; "
          f"float32; {t} threads; OpenMP wait policy {policy}")
    report: dict[str, Any] = {}
    for name in names:
        model_dir = build(name)
        results: dict[str, dict[str, Any]] = {
            "tessera": isolated(tessera_batched, model_dir, requests, t),
        }
        if "hf" in peers:
            results["transformers"] = isolated(hf_batched, model_dir, requests, t,
                                               args.hf_batch_size)
        if "llamacpp" in peers:
            results["llama.cpp"] = isolated(llamacpp_batched, model_dir, requests, t,
                                            args.parallel)
        _print_table(f"{name} ({model_dir})", results)
        batch1: dict[str, dict[str, Any]] = {}
        if not args.no_batch1:
            batch1["tessera"] = isolated(tessera_batch1, model_dir, t)
            if "llamacpp" in peers:
                batch1["llama.cpp"] = isolated(llamacpp_batch1, model_dir, t)
            print("batch-1 decode:")
            for engine, r in batch1.items():
                if "error" in r:
                    print(f"{engine:<14}  skipped: {r['error']}")
                else:
                    print(f"{engine:<14}{r['decode_tokens_per_s']:>14.1f} tokens/s")
        report[name] = {"batched": results, "batch1": batch1}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
