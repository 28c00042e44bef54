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
from collections.abc import Iterable

import torch

from tessera.kv.connector import BlockLoad, BlockSave, LoadResult
from tessera.kv.disk_tier import DiskTier
from tessera.kv.host_tier import HostTier
from tessera.kv.keys import Block
from tessera.kv.shared_host_tier import SharedHostTier
from tessera.outputs import KVTierStats

logger = logging.getLogger(__name__)


class TieredKVConnector:
    """Implements ``tessera.kv.connector.KVConnector`` over a host tier, an SSD tier or both.

    ``kv_caches`` are the engine's per-layer caches; block ``b`` of a layer is
    ``cache.select(block_axis, b)``, the same shape in every layer."""

    def __init__(self, kv_caches: list[torch.Tensor], block_axis: int, block_size: int,
                 fingerprint: str, host_bytes: int | None = None, disk_dir: str | None = None,
                 disk_bytes: int | None = None, host_store: str | None = None) -> None:
        """``host_store`` (``ipc://PATH`` of a ``tessera kv store``) makes the host tier the
        store's shared arena instead of a pool of ``host_bytes`` of this process."""
        if host_bytes is None and disk_dir is None and host_store is None:
            raise ValueError("a tiered KV connector needs kv_offload_memory, kv_host_store "
                             "or kv_offload_dir")
        self.kv_caches = kv_caches
        self.block_axis = block_axis
        self.block_size = block_size
        first = kv_caches[0].select(block_axis, 0)
        self.block_shape = (len(kv_caches), *first.shape)  # [layers, *one layer's block]
        self.kv_dtype = first.dtype
        self.block_bytes = math.prod(self.block_shape) * first.element_size()
        on_cuda = first.device.type == "cuda"
        self.host: HostTier | SharedHostTier | None = None
        if host_store is not None:
            self.host = SharedHostTier(host_store, fingerprint, self.block_bytes)
        elif host_bytes is not None:
            self.host = HostTier(host_bytes, self.block_bytes, pin_memory=on_cuda)
        self._last_lookup: tuple[list[int], int, int] = ([], -1, 0)
        self.disk = (DiskTier(disk_dir, disk_bytes if disk_bytes is not None else 1 << 36,
                              fingerprint) if disk_dir is not None else None)

    # ----------------------------------------------------------------- scheduler side
    def num_loadable_blocks(self, keys: Iterable[int]) -> int:
        keys = list(keys)
        n = self.host.num_leading(keys) if self.host is not None else 0
        self._last_lookup = (keys[:1], len(keys), n)
        if self.disk is not None:
            while n < len(keys) and keys[n] in self.disk:
                n += 1
        return n

    def commit_lookup(self, keys: list[int], num_loading_blocks: int) -> None:
        # The host's answer to the scheduler's lookup of these keys, just before.
        first, num, num_in_host = self._last_lookup
        if (first, num) != (keys[:1], len(keys)):
            num_in_host = 0
        if self.host is not None:
            with self.host.counters.lock:
                self.host.counters.num_queried_tokens += len(keys) * self.block_size
        if self.disk is not None:
            with self.disk.counters.lock:
                self.disk.counters.num_queried_tokens += (
                    (len(keys) - num_in_host) * self.block_size)

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
                num_ok = self._load(load)
            except Exception:  # a bug or device error: recompute rather than fail the request
                logger.exception("loading KV blocks failed; recomputing them")
            result.num_loaded_blocks.append(num_ok)
        return result

    def _load(self, load: BlockLoad) -> int:
        blocks = [Block(key, load.parent_key if j == 0 else load.keys[j - 1], load.token_ids[j])
                  for j, key in enumerate(load.keys)]
        n = 0
        if self.host is not None:
            n = self.host.load(blocks, lambda j, flat: self._to_device(load.block_ids[j], flat))
            with self.host.counters.lock:
                self.host.counters.num_hit_tokens += n * self.block_size
                self.host.counters.num_read_bytes += n * self.block_bytes
        if self.disk is None:
            return n
        promoted: list[tuple[Block, torch.Tensor]] = []
        while n < len(blocks):
            b = blocks[n]
            payload = self.disk.read(b.key, b.parent_key, b.token_ids)
            if payload is None:
                break
            flat = torch.frombuffer(payload, dtype=torch.uint8)
            self._to_device(load.block_ids[n], flat)
            promoted.append((b, flat))
            with self.disk.counters.lock:
                self.disk.counters.num_hit_tokens += self.block_size
            n += 1
        if promoted and self.host is not None:  # the next hit is a memcpy
            self.host.store([b for b, _ in promoted],
                            lambda j, slot: slot.copy_(promoted[j][1]))
        return n

    def save(self, saves: list[BlockSave]) -> None:
        try:
            self._save(saves)
        except Exception:
            logger.exception("saving KV blocks failed; they stay on the device only")

    def _save(self, saves: list[BlockSave]) -> None:
        if self.host is not None:
            self.host.store([Block(s.key, s.parent_key, s.token_ids) for s in saves],
                            lambda j, slot: self._from_device(saves[j].block_id, slot))
        disk = self.disk
        if disk is None or not disk.writable:
            return
        for save in saves:
            if save.key in disk:
                continue
            # The writer thread needs bytes nobody overwrites: its own copy.
            buf = torch.empty(self.block_bytes, dtype=torch.uint8)
            self._from_device(save.block_id, buf)
            disk.put(save.key, save.parent_key, save.token_ids, buf.numpy())

    # ----------------------------------------------------------------- stats, lifecycle
    def stats(self) -> tuple[KVTierStats, ...]:
        tiers = [t.stats() for t in (self.host, self.disk) if t is not None]
        return tuple(tiers)

    def close(self) -> None:
        if self.host is not None:
            self.host.close()
        if self.disk is not None:
            self.disk.close()
