"""Engine configuration: frozen dataclasses built once at the edge and passed down.

Values only known at run time (number of KV blocks, end-of-sequence ids, the effective context
length) live in ``RuntimeInfo``, never written back into the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tessera.afd.config import AFDConfig
from tessera.cli_options import option

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduling step. Pure data: the scheduler imports no torch."""

    max_num_seqs: int = option(256, "most sequences running at once (decoding or mid-prefill)")
    max_num_batched_tokens: int = option(
        2048, "token budget of one step, shared by decodes (1 token each) and prefill chunks")
    enable_chunked_prefill: bool = option(
        True, "do not split long prompts over several steps (each is prefilled in one step, "
        "which caps the context length at --max-num-batched-tokens)",
        flag="--no-chunked-prefill")

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )

    def per_lane(self, num_lanes: int) -> SchedulerConfig:
        """The config of one of ``num_lanes`` schedulers sharing these limits (an attention
        worker's micro-batches): the sequence cap is shared out; the token budget is per step,
        so per lane."""
        return replace(self, max_num_seqs=max(1, -(-self.max_num_seqs // num_lanes)))


@dataclass(frozen=True)
class CacheConfig:
    """How the paged KV cache is sized and shared."""

    block_size: int = option(16, "tokens per KV block")
    kv_cache_memory: int | None = option(
        None, "bytes for the KV cache (default: a fraction of free memory, see "
        "--kv-cache-memory-fraction)")
    kv_cache_memory_fraction: float | None = option(
        None, "fraction of free device memory after loading weights for the KV cache when "
        "--kv-cache-memory is not given (default: 0.25 on CPU, 0.8 on accelerators)")
    enable_prefix_caching: bool = option(
        True, "do not reuse KV blocks of identical prompt prefixes across requests",
        flag="--no-prefix-caching")
    # A narrower cache than the model holds twice the tokens and halves the bytes decode
    # attention reads (llama.cpp's default is an f16 cache); attention computes in float32.
    kv_cache_dtype: str = option("auto", "KV cache dtype (auto: the model's)", choices=DTYPES)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive bytes, got {self.kv_cache_memory}")
        if self.kv_cache_dtype not in DTYPES:
            raise ValueError(
                "kv_cache_dtype must be auto, float32, bfloat16 or float16, "
                f"got {self.kv_cache_dtype!r}"
            )
        frac = self.kv_cache_memory_fraction
        if frac is not None and not 0.0 < frac <= 1.0:
            raise ValueError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is built from; made once by ``LLM`` or the CLI."""

    model: str
    """Path of a Hugging Face model directory (config.json + safetensors)."""
    dtype: str = option("auto", "weight dtype (auto: the checkpoint's)", choices=DTYPES)
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    max_model_len: int | None = option(
        None, "longest prompt plus output (default: the model's max_position_embeddings)")
    seed: int = option(0, "seed for requests that do not bring their own")
    num_threads: int | None = option(
        None, "CPU threads for torch (default: torch's)", flag="--threads")
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    afd: AFDConfig | None = None
    """Attention/FFN disaggregation over worker processes; None runs in this process."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")


@dataclass(frozen=True)
class RuntimeInfo:
    """Facts found while starting the engine (after loading the model and sizing the cache)."""

    num_kv_blocks: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    vocab_size: int
