"""Micro-benchmark of decode attention over a paged KV cache (CPU).

Compares, per call (one layer, one decode step):
  * kernel   - ``paged_decode_attention`` (fused C++ kernel, K/V read in place)
  * padded   - the previous approach: gather every sequence's blocks into a padded
               [B, KVH, L, d] copy with ``index_select``, then masked SDPA
  * per-seq  - the pure-torch fallback: per-sequence gather of its own blocks, unmasked SDPA

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/attention_kernels.py`` (the first run builds
the kernel). Times are medians of several rounds; compare columns within one run. With
``--layers N`` every call passes over N caches of the same shape, as a decode step passes over
its layers, and the time is per layer: one small batch's cache otherwise stays in the last-level
cache between calls, which a real step's never does (``--layers 12 --threads 1`` is one
32-sequence lane of ``transformerless.py``'s workload on one of its one-thread workers).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tessera.model.kernels import paged_decode as pd


def padded_gather_sdpa(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """The decode path before the kernel (gather into a padded copy, masked SDPA): [B, H, d]."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    flat = tables.view(-1)
    # [B * max_blocks, block_size, KVH, d] -> [B, L, KVH, d] -> [B, KVH, L, d]
    keys = kv_cache[0].index_select(0, flat).view(batch, -1, num_kv_heads, head_dim)
    values = kv_cache[1].index_select(0, flat).view(batch, -1, num_kv_heads, head_dim)
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    idx = torch.arange(tables.shape[1] * block_size)  # [L]
    mask = idx < lens.unsqueeze(1)  # [B, L]
    if window is not None:
        mask &= idx > lens.unsqueeze(1) - 1 - window
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, H, 1, d]
        keys,
        values,
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [B, H, 1, d]
    return o.squeeze(2)


def make_batch(
    lens: list[int], heads: int, kv_heads: int, dim: int, block_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, a cache with shuffled block ids, block tables padded with 0, and lengths."""
    need = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(need) + 1
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(lens), max(need), dtype=torch.int64)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor(perm[used : used + n])
        used += n
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, dtype=dtype)
    q = torch.randn(len(lens), heads, dim, dtype=dtype)
    return q, cache, tables, torch.tensor(lens, dtype=torch.int64)


def time_call(fn: Callable[[], object], rounds: int, min_time: float = 0.2) -> float:
    """Median seconds per call over ``rounds`` rounds, each repeating ``fn`` for >= min_time."""
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    reps = max(1, int(min_time / once))
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--layers", type=int, default=1,
                        help="caches each call passes over (time reported per layer)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    available = pd.kernel_available()
    print(
        f"kernel available: {available} (first call / load took {time.perf_counter() - start:.1f} s)"
    )
    print(
        f"threads={args.threads} heads={args.heads} kv_heads={args.kv_heads} d={args.head_dim} "
        f"block_size={args.block_size} dtype={args.dtype} window={args.window} "
        f"layers={args.layers} (ms per layer)"
    )

    gen = torch.Generator().manual_seed(1)
    configs = {
        "B=1, ctx 512": [512],
        "B=24, ctx 32..1300": torch.randint(32, 1301, (24,), generator=gen).tolist(),
        "B=64, ctx 32..1300": torch.randint(32, 1301, (64,), generator=gen).tolist(),
        "B=32, ctx 64..128": torch.randint(64, 129, (32,), generator=gen).tolist(),
    }
    num_layers = max(args.layers, 1)
    header = f"{'batch':<22}{'kernel ms':>11}{'padded ms':>11}{'per-seq ms':>12}{'vs padded':>11}{'vs per-seq':>12}"
    print(header)
    print("-" * len(header))
    for name, lens in configs.items():
        q, cache, tables, seq_lens = make_batch(
            lens, args.heads, args.kv_heads, args.head_dim, args.block_size, dtype
        )
        scale = args.head_dim**-0.5
        call_args = (q, cache, tables, seq_lens, scale, args.window)
        layer_args = [call_args] + [
            (q, torch.randn_like(cache), tables, seq_lens, scale, args.window)
            for _ in range(num_layers - 1)
        ]
        ref = pd.paged_decode_reference(*call_args)

        def over_layers(fn: Callable[..., object],
                        layers: list[tuple] = layer_args) -> Callable[[], object]:
            return lambda: [fn(*a) for a in layers]

        fns: dict[str, Callable[[], object]] = {
            "padded": over_layers(padded_gather_sdpa),
            "per-seq": over_layers(pd.paged_decode_reference),
        }
        if available:
            out = pd.paged_decode_attention(*call_args)
            err = (out.float() - ref.float()).abs().max().item()
            assert err < (1e-4 if dtype == torch.float32 else 5e-2), f"kernel mismatch: {err}"
            fns["kernel"] = over_layers(pd.paged_decode_attention)
        times = {k: time_call(fn, args.rounds) * 1e3 / num_layers for k, fn in fns.items()}
        kernel = times.get("kernel", float("nan"))
        print(
            f"{name:<22}{kernel:>11.3f}{times['padded']:>11.3f}{times['per-seq']:>12.3f}"
            f"{times['padded'] / kernel:>10.1f}x{times['per-seq'] / kernel:>11.1f}x"
        )


if __name__ == "__main__":
    main()
