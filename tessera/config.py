"""Engine configuration: frozen dataclasses built once at the edge and passed down.

Values only known at run time (number of KV blocks, end-of-sequence ids, the effective context
length) live in ``RuntimeInfo``, never written back into the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tessera.cli_options import option
from tessera.kv.store_url import parse_store_url

DTYPES = ("auto", "float32", "bfloat16", "float16")
DATA_PLANES = ("auto", "torch", "shm")
SPECULATIVE_METHODS = ("ngram",)
QUANTIZATION_SCHEMES = ("int8",)
MAX_SPECULATIVE_TOKENS = 16


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
    speculative_method: str | None = option(
        None, "draft tokens for each decoding sequence and verify them in the same step: "
        "ngram (prompt lookup: what followed the latest earlier occurrence of the sequence's "
        "last tokens)", choices=SPECULATIVE_METHODS)
    num_speculative_tokens: int = option(
        4, "most draft tokens per sequence and step; each sequence's draft length follows its "
        "acceptance (grows after a fully accepted draft, shrinks after a rejection)")
    prompt_lookup_min: int = option(1, "ngram: shortest suffix of a sequence looked up")
    prompt_lookup_max: int = option(4, "ngram: longest suffix of a sequence looked up "
                                    "(longer suffixes are tried first)")

    def __post_init__(self) -> None:
        if self.speculative_method is not None and \
                self.speculative_method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}"
                             f", got {self.speculative_method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be at most {MAX_SPECULATIVE_TOKENS}, "
                             f"got {self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
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
    kv_offload_memory: int | None = option(
        None, "bytes of host memory for a KV tier below the device pool: blocks that fall out "
        "of the pool, or of a preempted sequence, are copied back instead of recomputed")
    kv_host_store: str | None = option(
        None, "ipc://PATH of a host KV store ('tessera kv store') whose shared memory is this "
        "engine's host tier, shared with the other engines of the host (instead of "
        "--kv-offload-memory)")
    kv_offload_dir: str | None = option(
        None, "directory of an SSD KV tier: full blocks are written there and found again by "
        "any engine with the same model and cache layout, also after a restart")
    kv_offload_disk: int = option(64 << 30, "byte budget of the SSD KV tier")
    # Not in the repr: the URL may carry the store's password.
    kv_store: str | None = option(
        None, "redis://HOST[:PORT][/DB] of a Redis or Valkey server holding a remote KV tier, "
        "shared by the engines of every host that reach it (below the host and SSD tiers)",
        repr=False)

    def on_host_store(self, address: str) -> CacheConfig:
        """This cache with its host tier in the store at ``address`` (shared with the other
        engines of the host) instead of a pool of its own."""
        return replace(self, kv_offload_memory=None, kv_host_store=address)

    @property
    def offloads_kv(self) -> bool:
        """Whether KV tiers below the device pool are configured."""
        return (self.kv_offload_memory is not None or self.kv_offload_dir is not None
                or self.kv_host_store is not None or self.kv_store is not None)

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
        for name in ("kv_offload_memory", "kv_offload_disk"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise ValueError(f"{name} must be positive bytes, got {value!r}")
        if self.kv_host_store is not None:
            if not str(self.kv_host_store).startswith("ipc://") or len(self.kv_host_store) < 7:
                raise ValueError(f"kv_host_store must be ipc://PATH, got {self.kv_host_store!r}")
            if self.kv_offload_memory is not None:
                raise ValueError("give kv_offload_memory (a host tier of this engine) or "
                                 "kv_host_store (a shared one), not both")
        if self.kv_offload_dir is not None and not str(self.kv_offload_dir).strip():
            raise ValueError("kv_offload_dir must be a directory path, got an empty string")
        if self.kv_store is not None:
            parse_store_url(self.kv_store)
        frac = self.kv_cache_memory_fraction
        if frac is not None and not 0.0 < frac <= 1.0:
            raise ValueError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )


@dataclass(frozen=True)
class AFDConfig:
    """How many workers of each kind, how batches are pipelined and how failures are found.

    ``attention_workers`` data-parallel engines each own a scheduler, a KV cache and the
    attention side of the model; ``ffn_workers`` hold the FFN side of every layer (a tensor-
    parallel shard of a dense FFN's intermediate dimension). Any ratio of the two works.
    """

    attention_workers: int = option(1, "data-parallel attention worker processes")
    ffn_workers: int = option(1, "FFN worker processes (tensor-parallel FFN shards)")
    micro_batches: int = option(
        2, "micro-batches (lanes, each stepping on its own) per attention worker; with 2 one "
        "lane's FFN work overlaps the other's attention, LM head and sampling")
    data_plane: str = option(
        "auto", "how workers exchange hidden states: shared memory (local CPU workers), "
        "torch.distributed, or auto (shm where it applies)", choices=DATA_PLANES)
    """How hidden states travel. ``"torch"``: torch.distributed point-to-point (gloo on CPU,
    the platform's backend elsewhere). ``"shm"``: shared memory, for CPU workers on one host
    (``tessera.afd.shm_plane``). ``"auto"``: shm for local CPU workers where the host supports
    it, else torch. Ray-placed workers always use torch."""
    ffn_head_share: float = option(
        0.0, "share (0 to 1) of the LM head's vocabulary computed on the FFN workers, to "
        "balance the two pools (0: all on the attention workers)")
    """Share of the LM head's vocabulary computed on the FFN workers (0 to 1). The head is a
    large stateless matmul after the last layer; with 0 it runs whole on each attention worker
    (the single-process layout). With a share s the attention worker keeps the first
    ``1 - s`` of the vocabulary rows and the FFN workers split the rest, each answering with
    its slice of the logits, so the two sides compute the head at the same time. Raise it where
    the attention workers are the busier side (their trace shows little ``wait``; see
    docs/transformerless.md); the tokens do not change."""
    transfer_timeout_s: float = 30.0
    """Deadline of every FFN transfer, counted from the start of the step that issued it."""
    heartbeat_interval_s: float = 0.5
    failure_detect_s: float = 3.0
    """A worker silent for this long (no heartbeat) is declared dead, and so is one whose main
    loop makes no progress for this long while it has work (see ``progress.py``): it must
    exceed the longest single FFN layer or lane step."""
    startup_timeout_s: float = 300.0
    """Longest wait for all workers to load their weights and join the data plane."""
    master_port: int | None = None
    """Rendezvous port of the first data-plane group; None picks a free one. A restarted pool
    always picks a fresh free port."""
    trace_path: str | None = option(
        None, "write a Chrome trace of worker compute and transfers to this file",
        flag="--trace")
    ray_address: str | None = option(
        None, "place the workers on a Ray cluster: auto (the cluster 'ray start' runs on this "
        "host), HOST:PORT, or local (a private Ray)")
    """Place the workers on a Ray cluster instead of local processes: ``"auto"`` (the cluster
    ``ray start`` runs on this host), ``"HOST:PORT"`` (its GCS address) or ``"local"`` (a
    private single-node Ray started for this process). None: local processes."""
    placement_timeout_s: float = 60.0
    """Ray only: longest wait for the cluster to grant the workers' placement group."""

    def __post_init__(self) -> None:
        for name in ("attention_workers", "ffn_workers", "micro_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
        if self.micro_batches > 16:
            raise ValueError(f"micro_batches must be at most 16, got {self.micro_batches}")
        if self.data_plane not in DATA_PLANES:
            raise ValueError(
                f"data_plane must be one of {', '.join(DATA_PLANES)}, got {self.data_plane!r}"
            )
        share = self.ffn_head_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise ValueError(f"ffn_head_share must be a number from 0 to 1, got {share!r}")
        for name in ("transfer_timeout_s", "heartbeat_interval_s", "failure_detect_s",
                     "startup_timeout_s", "placement_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.failure_detect_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"failure_detect_s ({self.failure_detect_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s})"
            )

        if self.ray_address is not None:
            if self.data_plane == "shm":
                raise ValueError("data_plane 'shm' needs local workers, not ray_address")
            if not isinstance(self.ray_address, str) or not self.ray_address.strip():
                raise ValueError(f"ray_address must be a non-empty string, got {self.ray_address!r}")
            if self.ray_address.startswith("ray://"):
                raise ValueError(
                    f"ray_address {self.ray_address!r}: Ray Client (ray://) is not supported; "
                    "run tessera on a node of the cluster with 'auto' or the GCS HOST:PORT"
                )

    @property
    def world_size(self) -> int:
        """Ranks of the data plane: attention workers first, then FFN workers."""
        return self.attention_workers + self.ffn_workers

    def ffn_ranks(self) -> list[int]:
        return list(range(self.attention_workers, self.world_size))

    def worker_name(self, rank: int) -> str:
        """The name a data-plane rank goes by in messages and errors (``attn0``, ``ffn1``)."""
        if rank < self.attention_workers:
            return f"attn{rank}"
        return f"ffn{rank - self.attention_workers}"


ROUTER_POLICIES = ("kv", "least_loaded", "round_robin")


@dataclass(frozen=True)
class ClusterConfig:
    """Several engine instances of one model behind a router (``tessera.cluster``): each
    instance is its own process with its own scheduler and KV cache. ``data_parallel`` of them
    each serve whole requests; or ``prefill_instances`` compute prompts and hand their KV to
    ``decode_instances``."""

    data_parallel: int = option(1, "engine instances of the model, each its own process, "
                                "behind a router")
    router_policy: str = option(
        "kv", "how the router places requests: kv (prefix blocks an instance holds against "
        "its load), least_loaded, round_robin", choices=ROUTER_POLICIES)
    router_overlap_weight: float = option(
        1.0, "kv policy: cost of each prompt block an instance would have to compute")
    router_load_weight: float = option(
        0.5, "kv policy: cost of each prompt block an instance has queued to compute (and of "
        "each request it decodes)")
    """With 0.5, an instance holding a prefix keeps taking the requests that share it until
    the prompt blocks queued on it are twice those the prefix saves each one."""
    prefill_instances: int = option(
        0, "instances that compute prompts (and each request's first token) and hand their KV "
        "to the decode instances through a shared host KV tier (with --decode-instances)")
    decode_instances: int = option(
        0, "instances that decode the requests prefill instances started")
    decode_attention_workers: int = option(
        0, "make each decode instance a Transformerless group of this many attention workers "
        "(with --decode-ffn-workers)")
    decode_ffn_workers: int = option(
        0, "FFN workers of each decode instance's Transformerless group")
    decode_micro_batches: int = option(
        2, "micro-batches per attention worker of a decode instance's Transformerless group")
    instances_ray_address: str | None = option(
        None, "start the instances as Ray actors on a Ray cluster (auto, HOST:PORT, or local) "
        "instead of local processes; their sockets are TCP with CURVE keys", )
    max_request_retries: int = option(
        1, "times a request whose instance failed is placed on another (recomputed from its "
        "tokens) before it ends with an error")
    instance_stall_timeout_s: float = 120.0
    """An instance with requests that reports nothing for this long is killed and restarted
    (a step of the longest prompt chunk must fit well inside it)."""
    instance_startup_timeout_s: float = 600.0
    """Longest wait for an instance to load the model and warm up."""

    @property
    def num_instances(self) -> int:
        return self.prefill_instances + self.decode_instances or self.data_parallel

    @property
    def roles(self) -> list[str]:
        """Each instance's role: ``prefill``, ``decode``, or ``both`` (data parallelism)."""
        if not self.prefill_instances:
            return ["both"] * self.data_parallel
        return ["prefill"] * self.prefill_instances + ["decode"] * self.decode_instances

    def decode_group(self) -> AFDConfig | None:
        """The Transformerless group each decode instance is, if it is one."""
        if not self.decode_attention_workers:
            return None
        return AFDConfig(attention_workers=self.decode_attention_workers,
                         ffn_workers=self.decode_ffn_workers,
                         micro_batches=self.decode_micro_batches)

    @property
    def enabled(self) -> bool:
        """Whether these options ask for more than one plain engine."""
        return self.num_instances > 1 or self.prefill_instances > 0

    def __post_init__(self) -> None:
        for name in ("data_parallel", "max_request_retries", "prefill_instances",
                     "decode_instances", "decode_attention_workers", "decode_ffn_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.data_parallel < 1:
            raise ValueError(f"data_parallel must be at least 1, got {self.data_parallel}")
        if (self.prefill_instances > 0) != (self.decode_instances > 0):
            raise ValueError("prefill_instances and decode_instances go together: give both")
        if self.prefill_instances and self.data_parallel > 1:
            raise ValueError("give data_parallel or prefill_instances/decode_instances, not both")
        if (self.decode_attention_workers > 0) != (self.decode_ffn_workers > 0):
            raise ValueError("decode_attention_workers and decode_ffn_workers go together: "
                             "give both")
        if self.instances_ray_address is not None and self.prefill_instances:
            raise ValueError("prefill/decode instances on Ray are not supported yet (their "
                             "handoff goes through a store on the front's host): use "
                             "data_parallel, or tessera router in front of servers sharing "
                             "--kv-store")
        if self.instances_ray_address is not None and not self.instances_ray_address.strip():
            raise ValueError("instances_ray_address must not be empty")
        if self.decode_attention_workers and not self.decode_instances:
            raise ValueError("decode_attention_workers needs prefill_instances and "
                             "decode_instances")
        self.decode_group()  # a bad micro-batch count fails here, not at launch
        if self.num_instances > 64:
            raise ValueError(f"a cluster has at most 64 instances, got {self.num_instances}")
        if self.router_policy not in ROUTER_POLICIES:
            raise ValueError(f"router_policy must be one of {', '.join(ROUTER_POLICIES)}, "
                             f"got {self.router_policy!r}")
        for name in ("router_overlap_weight", "router_load_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        for name in ("instance_stall_timeout_s", "instance_startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


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
    quantization: str | None = option(
        None, "quantize the weights at load time: int8 (weight-only, one scale per output "
        "channel; activations stay in the model's dtype)", choices=QUANTIZATION_SCHEMES)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    afd: AFDConfig | None = None
    """Attention/FFN disaggregation over worker processes; None runs in this process."""
    cluster: ClusterConfig | None = None
    """Several instances behind a router; None runs one."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_SCHEMES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_SCHEMES)}, "
                             f"got {self.quantization!r}")
        if self.quantization is not None and self.afd is not None:
            raise ValueError("quantization is not supported in a Transformerless pool yet "
                             "(its FFN workers load the weights themselves)")
        if self.cluster is not None and self.afd is not None:
            raise ValueError("data_parallel instances of a Transformerless pool are not "
                             "supported: give data_parallel or attention_workers/ffn_workers")


@dataclass(frozen=True)
class RuntimeInfo:
    """Facts found while starting the engine (after loading the model and sizing the cache)."""

    num_kv_blocks: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    vocab_size: int
