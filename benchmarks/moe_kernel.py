"""Routed experts on CPU: Tessera's native kernel vs the oneDNN-packed and plain torch paths
(the peers, measured in the same run on the same weights and routing).

One MoE layer's experts (default: the benchmark Mixtral's, 8 experts of 512 -> 2x1024 -> 512,
top-2) for a range of token counts; ``--layers`` distinct copies are called in turn, so each
call reads its weights from memory as a decode step does, not from the cache. Times are ms per
layer (the best of ``--repeats`` passes over the copies).

    python benchmarks/moe_kernel.py [--threads 1,2] [--tokens 1,16,64,128,256,1024]
    python benchmarks/moe_kernel.py --arch qwen3_moe   # 16 experts of 512 -> 2x256, top-4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def ms_per_layer(layers: list, x, ids, weights, repeats: int) -> float:
    """Best of ``repeats`` passes over ``layers`` (each called once per pass), ms per layer."""
    import torch

    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for layer in layers:
                layer(x, ids, weights)
            best = min(best, (time.perf_counter() - t0) / len(layers))
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--arch", default="mixtral", choices=["mixtral", "qwen3_moe"])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--tokens", default="1,16,64,128,256,1024")
    p.add_argument("--layers", type=int, default=6, help="distinct copies of the layer")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",")]
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error("--threads and --tokens take comma-separated integers")
    if min(threads + tokens + [args.layers, args.repeats]) < 1:
        p.error("every count must be at least 1")

    import torch

    from benchmarks.models import ARCH_DEFAULTS
    from tessera.model.experts import Experts
    from tessera.model.kernels import linear as kl
    from tessera.model.kernels.moe_kernel import experts_kernel_available
    from tessera.model.moe import moe_spec_from_config

    if not experts_kernel_available():
        print("the native experts kernel is not available here (it needs the C++ kernels "
              "built with AVX-512); nothing to compare", file=sys.stderr)
        return 1
    cfg = {"model_type": args.arch, "architectures": ["X"], "vocab_size": 1000,
           "num_attention_heads": 8, **ARCH_DEFAULTS[args.arch]}
    moe = moe_spec_from_config(cfg)
    assert moe is not None
    gen = torch.Generator().manual_seed(0)
    paths: dict[str, list[Experts]] = {"native": [], "oneDNN packed": [], "plain": []}
    for _ in range(args.layers):
        base = Experts(moe)
        with torch.no_grad():
            for param in base.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        for name, layer in paths.items():
            copy = Experts(moe)
            copy.load_state_dict(base.state_dict())
            if name == "native":
                copy.pack_weights()
            elif name == "oneDNN packed":
                # Per-expert matmuls in oneDNN's layout: weight panels held off, as where the
                # C++ kernels lack AVX-512.
                available = kl.panel_available
                kl.panel_available = lambda: False  # type: ignore[assignment]
                try:
                    copy.pack_weights(native=False)
                finally:
                    kl.panel_available = available  # type: ignore[assignment]
            layer.append(copy)
    top_k, num_experts = moe.top_k, moe.num_experts
    print(f"{args.arch}: {num_experts} experts of {moe.hidden_size} -> 2x"
          f"{moe.moe_intermediate_size}, top-{top_k}; ms per layer")
    print(f"{'threads':>7} {'tokens':>6} {'rows/expert':>11} {'native':>8} {'oneDNN':>8} "
          f"{'plain':>8} {'vs oneDNN':>10} {'vs plain':>9}")
    for num_threads in threads:
        torch.set_num_threads(num_threads)
        for num_tokens in tokens:
            x = torch.randn(num_tokens, moe.hidden_size, generator=gen)
            ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k]
                               for _ in range(num_tokens)])
            weights = torch.rand(num_tokens, top_k, generator=gen)
            with torch.inference_mode():  # the same answers (and every path warm)
                want = paths["plain"][0](x, ids, weights)
                for name in ("native", "oneDNN packed"):
                    got = paths[name][0](x, ids, weights)
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            ms = {name: ms_per_layer(layers, x, ids, weights, args.repeats)
                  for name, layers in paths.items()}
            rows = num_tokens * top_k / num_experts
            print(f"{num_threads:>7} {num_tokens:>6} {rows:>11.4g} {ms['native']:>8.3f} "
                  f"{ms['oneDNN packed']:>8.3f} {ms['plain']:>8.3f} "
                  f"{ms['oneDNN packed'] / ms['native']:>9.2f}x "
                  f"{ms['plain'] / ms['native']:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
