"""The KV connector over Tessera's own tiers: host memory, then SSD.

Saves are write-through: a block that becomes full of computed KV is copied into the host
tier at the end of its step (a memcpy, so the device block can be freed right after) and
queued for the SSD tier from that copy. Loads take each block from the nearest tier holding
it; a block read from SSD is promoted into the host tier. A block whose load fails ends the
sequence's load there; the scheduler recomputes it and everything after it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import torch

from tessera.kv.connector import BlockLoad, BlockSave, LoadResult
from tessera.kv.disk_tier import DiskTier
from tessera.kv.host_tier import HostTier
from tessera.outputs import KVTierStats

logger = logging.getLogger(__name__)


class TieredKVConnector:
    """Implements ``tessera.kv.connector.KVConnector`` over a host tier, an SSD tier or both.

    ``kv_caches`` are the engine's per-layer caches; block ``b`` of a layer is
    ``cache.select(block_axis, b)``, the same shape in every layer."""

    def __init__(self, kv_caches: list[torch.Tensor], block_axis: int, block_size: int,
                 fingerprint: str, host_bytes: int | None = None, disk_dir: str | None = None,
                 disk_bytes: int | None = None) -> None:
        if host_bytes is None and disk_dir is None:
            raise ValueError("a tiered KV connector needs kv_offload_memory or kv_offload_dir")
        self.kv_caches = kv_caches
        self.block_axis = block_axis
        self.block_size = block_size
        first = kv_caches[0].select(block_axis, 0)
        self.block_shape = (len(kv_caches), *first.shape)  # [layers, *one layer's block]
        self.kv_dtype = first.dtype
        self.block_bytes = math.prod(self.block_shape) * first.element_size()
        on_cuda = first.device.type == "cuda"
        self.host = (HostTier(host_bytes, self.block_bytes, pin_memory=on_cuda)
                     if host_bytes is not None else None)
        self.disk = (DiskTier(disk_dir, disk_bytes if disk_bytes is not None else 1 << 36,
                              fingerprint) if disk_dir is not None else None)

    # ----------------------------------------------------------------- scheduler side
    def _holds(self, key: int) -> bool:
        return (self.host is not None and key in self.host) or (
            self.disk is not None and key in self.disk)

    def num_loadable_blocks(self, keys: Iterable[int]) -> int:
        n = 0
        for key in keys:
            if not self._holds(key):
                break
            n += 1
        return n

    def commit_lookup(self, keys: list[int], num_loading_blocks: int) -> None:
        if self.host is not None:
            with self.host.counters.lock:
                self.host.counters.num_queried_tokens += len(keys) * self.block_size
        if self.disk is not None:
            host = self.host
            num_past_host = len(keys) if host is None else next(
                (len(keys) - i for i, k in enumerate(keys) if k not in host), 0)
            with self.disk.counters.lock:
                self.disk.counters.num_queried_tokens += num_past_host * self.block_size

    # ----------------------------------------------------------------- worker side
    def _layers(self, flat: torch.Tensor) -> torch.Tensor:
        """A host buffer [block_bytes] uint8 as [layers, *block] of the KV dtype."""
        return flat.view(self.kv_dtype).view(self.block_shape)

    def _to_device(self, block_id: int, flat: torch.Tensor) -> None:
        src = self._layers(flat)
        for layer, cache in enumerate(self.kv_caches):
            cache.select(self.block_axis, block_id).copy_(src[layer])

    def _from_device(self, block_id: int, flat: torch.Tensor) -> None:
        dst = self._layers(flat)
        for layer, cache in enumerate(self.kv_caches):
            dst[layer].copy_(cache.select(self.block_axis, block_id))

    def load(self, loads: list[BlockLoad]) -> LoadResult:
        result = LoadResult()
        for load in loads:
            num_ok = 0
            try:
                for j, key in enumerate(load.keys):
                    parent = load.parent_key if j == 0 else load.keys[j - 1]
                    if not self._load_block(key, parent, load.token_ids[j], load.block_ids[j]):
                        break
                    num_ok += 1
            except Exception:  # a bug or device error: recompute rather than fail the request
                logger.exception("loading KV blocks failed; recomputing them")
            result.num_loaded_blocks.append(num_ok)
        return result

    def _load_block(self, key: int, parent: int, token_ids: list[int], block_id: int) -> bool:
        if self.host is not None:
            start = time.perf_counter()
            slot = self.host.get(key, parent, token_ids)
            if slot is not None:
                self._to_device(block_id, slot)
                c = self.host.counters
                with c.lock:
                    c.num_hit_tokens += self.block_size
                    c.num_read_bytes += self.block_bytes
                    c.load_s.observe(time.perf_counter() - start)
                return True
        if self.disk is not None:
            payload = self.disk.read(key, parent, token_ids)
            if payload is not None:
                flat = torch.frombuffer(payload, dtype=torch.uint8)
                self._to_device(block_id, flat)
                if self.host is not None:  # promote: the next hit is a memcpy
                    self.host.put(key, parent, token_ids).copy_(flat)
                with self.disk.counters.lock:
                    self.disk.counters.num_hit_tokens += self.block_size
                return True
        return False

    def save(self, saves: list[BlockSave]) -> None:
        for save in saves:
            try:
                self._save_block(save)
            except Exception:
                logger.exception("saving a KV block failed; it stays on the device only")

    def _save_block(self, save: BlockSave) -> None:
        copy: torch.Tensor | None = None
        if self.host is not None and save.key not in self.host:
            start = time.perf_counter()
            copy = self.host.put(save.key, save.parent_key, save.token_ids)
            self._from_device(save.block_id, copy)
            c = self.host.counters
            with c.lock:
                c.num_written_bytes += self.block_bytes
                c.save_s.observe(time.perf_counter() - start)
        if self.disk is not None and self.disk.writable and save.key not in self.disk:
            # The writer thread needs bytes nobody overwrites: its own copy.
            buf = torch.empty(self.block_bytes, dtype=torch.uint8)
            if copy is not None:
                buf.copy_(copy)
            else:
                self._from_device(save.block_id, buf)
            self.disk.put(save.key, save.parent_key, save.token_ids, buf.numpy())

    # ----------------------------------------------------------------- stats, lifecycle
    def stats(self) -> tuple[KVTierStats, ...]:
        tiers = [t.stats() for t in (self.host, self.disk) if t is not None]
        return tuple(tiers)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
