"""Open the data plane a worker is given: shared memory or torch.distributed."""

from __future__ import annotations

from tessera.afd.dataplane import DataPlane, Plane
from tessera.afd.placement import head_split
from tessera.afd.shm_plane import PlaneLimits, ShmDataPlane
from tessera.messages.workers import WorkerConfig


def open_plane(cfg: WorkerConfig, backend: str, hidden_size: int, elem_bytes: int,
               top_k: int, vocab_size: int) -> Plane:
    """Join the data plane ``cfg`` names: shared memory in ``cfg.plane_dir`` if set, else
    torch.distributed with ``backend``. Attention ranks exchange with every FFN rank."""
    afd = cfg.afd
    names = [afd.worker_name(r) for r in range(afd.world_size)]
    if cfg.plane_dir is None:
        return DataPlane(cfg.rank, afd.world_size, cfg.master_addr, cfg.master_port, backend,
                         afd.startup_timeout_s, names, cfg.host_addr)
    sched = cfg.engine.scheduler
    max_tokens = sched.max_num_batched_tokens
    head_cols = [end - start for start, end in head_split(vocab_size, afd.ffn_head_share,
                                                          afd.ffn_workers)[1:]]
    limits = PlaneLimits(
        max_tokens=max_tokens,
        hidden_size=hidden_size,
        elem_bytes=elem_bytes,
        top_k=top_k,
        micro_batches=afd.micro_batches,
        max_head_cols=max(head_cols),
        # Every sampled row is one of the step's tokens.
        max_sample_rows=min(sched.max_num_seqs, max_tokens),
    )
    attention = cfg.rank < afd.attention_workers
    peers = afd.ffn_ranks() if attention else list(range(afd.attention_workers))
    return ShmDataPlane(cfg.rank, afd.world_size, cfg.plane_dir, limits, peers,
                        afd.startup_timeout_s, names)
