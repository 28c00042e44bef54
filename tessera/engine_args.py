"""Engine options shared by every command that builds an engine (generate, serve)."""

from __future__ import annotations

import argparse

from tessera.afd.config import AFDConfig
from tessera.config import CacheConfig, EngineConfig, SchedulerConfig

_DTYPES = ["auto", "float32", "bfloat16", "float16"]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Add the engine's options to a command's parser."""
    p.add_argument("--dtype", default="auto", choices=_DTYPES)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache size in bytes")
    p.add_argument("--kv-cache-dtype", default="auto", choices=_DTYPES,
                   help="KV cache dtype (auto: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="seed for requests without their own")
    afd = p.add_argument_group("attention/FFN disaggregation (both counts >= 1 to enable)")
    afd.add_argument("--attention-workers", type=int, default=0,
                     help="data-parallel attention worker processes")
    afd.add_argument("--ffn-workers", type=int, default=0,
                     help="FFN worker processes (tensor-parallel FFN shards)")
    afd.add_argument("--micro-batches", type=int, default=2,
                     help="micro-batches (lanes) per attention worker (default 2)")
    afd.add_argument("--data-plane", choices=("auto", "torch", "shm"), default="auto",
                     help="how workers exchange hidden states: shared memory (local CPU "
                     "workers), torch.distributed, or auto (shm where it applies)")
    afd.add_argument("--ffn-head-share", type=float, default=0.0, metavar="S",
                     help="share (0 to 1) of the LM head's vocabulary computed on the FFN "
                     "workers, to balance the two pools (default 0: all on attention workers)")
    afd.add_argument("--trace", default=None, metavar="FILE",
                     help="write a Chrome trace of worker compute and transfers to FILE")
    afd.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="place the workers on a Ray cluster: auto (the cluster started on "
                     "this host with 'ray start'), HOST:PORT, or local (a private Ray)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build the frozen engine config from parsed options; bad values raise ValueError."""
    return EngineConfig(
        model=str(args.model),
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        seed=args.seed,
        num_threads=args.threads,
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
        ),
        cache=CacheConfig(
            kv_cache_memory=args.kv_cache_memory,
            kv_cache_dtype=args.kv_cache_dtype,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        afd=afd_config_from_args(args),
    )


def afd_config_from_args(args: argparse.Namespace) -> AFDConfig | None:
    """None (single process) unless worker counts were given; bad values raise ValueError."""
    if not args.attention_workers and not args.ffn_workers:
        if args.trace is not None:
            raise ValueError("--trace needs --attention-workers and --ffn-workers")
        if args.ray_address is not None:
            raise ValueError("--ray-address needs --attention-workers and --ffn-workers")
        return None
    return AFDConfig(
        attention_workers=args.attention_workers,
        ffn_workers=args.ffn_workers,
        micro_batches=args.micro_batches,
        data_plane=args.data_plane,
        ffn_head_share=args.ffn_head_share,
        trace_path=args.trace,
        ray_address=args.ray_address,
    )
