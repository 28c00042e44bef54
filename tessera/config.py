"""Engine configuration: frozen dataclasses built once at the edge and passed down.

Values only known at run time (number of KV blocks, end-of-sequence ids, the effective context
length) live in ``RuntimeInfo``, never written back into the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tessera.afd.config import AFDConfig


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduling step. Pure data: the scheduler imports no torch."""

    max_num_seqs: int = 256
    """Most sequences running at once (decoding or mid-prefill)."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step, shared by decodes (1 token each) and prefill chunks."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several steps; when off a prompt is prefilled in one step."""

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

    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_memory: int | None = None
    """Bytes for the KV cache; None sizes it from ``kv_cache_memory_fraction``."""
    kv_cache_memory_fraction: float | None = None
    """Fraction of free device memory (after loading weights) for the KV cache when
    ``kv_cache_memory`` is None; None means 0.25 on CPU and 0.8 on accelerators."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests."""
    kv_cache_dtype: str = "auto"
    """auto (the model's dtype), float32, bfloat16 or float16. A narrower cache than the model
    holds twice the tokens and halves the bytes decode attention reads (llama.cpp's default is
    an f16 cache); attention still computes in float32."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive bytes, got {self.kv_cache_memory}")
        if self.kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
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
    dtype: str = "auto"
    """auto (the checkpoint's dtype), float32, bfloat16 or float16."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    max_model_len: int | None = None
    """Longest prompt plus output; None means the model's max_position_embeddings."""
    seed: int = 0
    """Seed for requests that do not bring their own."""
    num_threads: int | None = None
    """CPU threads for torch; None keeps torch's default."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    afd: AFDConfig | None = None
    """Attention/FFN disaggregation over worker processes; None runs in this process."""

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
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
