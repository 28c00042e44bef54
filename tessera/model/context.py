"""Per-step inputs every unit may read, built once per step by the model runner."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.model.attention import AttentionMetadata


@dataclass
class StepContext:
    """What a unit needs besides the hidden states: positions, attention metadata, KV caches.

    ``kv_caches[i]`` is layer i's cache; a worker holding only some layers' attention units
    still indexes by global layer id (missing layers may be None).
    """

    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    kv_caches: list[torch.Tensor | None]
