"""The KV connector over the tiers below the device pool: host memory, then SSD, then a
remote store shared across hosts.

Saves are write-through: a block that becomes full of computed KV is copied into the host
tier at the end of its step (a memcpy, so the device block can be freed right after) and
queued for the SSD and remote tiers from one copy. Loads take each block from the nearest
tier holding it; a block read from SSD or the remote store is promoted into the host tier.
The remote tier comes last: a local SSD read involves no network and no other engine's
traffic (docs/kv_tiers.md, "Remote tier"). A block whose load fails ends the
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
from tessera.kv.remote_tier import RemoteTier
from tessera.kv.shared_host_tier import SharedHostTier
from tessera.outputs import KVTierStats

logger = logging.getLogger(__name__)


class TieredKVConnector:
    """Implements ``tessera.kv.connector.KVConnector`` over any of a host tier, an SSD tier
    and a remote tier.

    ``kv_caches`` are the engine's per-layer caches; block ``b`` of a layer is
    ``cache.select(block_axis, b)``, the same shape in every layer."""

    def __init__(self, kv_caches: list[torch.Tensor], block_axis: int, block_size: int,
                 fingerprint: str, host_bytes: int | None = None, disk_dir: str | None = None,
                 disk_bytes: int | None = None, host_store: str | None = None,
                 remote_store: str | None = None) -> None:
        """``host_store`` (``ipc://PATH`` of a ``tessera kv store``) makes the host tier the
        store's shared arena instead of a pool of ``host_bytes`` of this process;
        ``remote_store`` (``redis://HOST:PORT``) adds the remote tier."""
        if host_bytes is None and disk_dir is None and host_store is None and remote_store is None:
            raise ValueError("a tiered KV connector needs kv_offload_memory, kv_host_store, "
                             "kv_offload_dir or kv_store")
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
        self._last_lookup: tuple[list[int], int, int, int] = ([], -1, 0, 0)
        self.disk = (DiskTier(disk_dir, disk_bytes if disk_bytes is not None else 1 << 36,
                              fingerprint) if disk_dir is not None else None)
        self.remote = (RemoteTier(remote_store, fingerprint, self.block_bytes)
                       if remote_store is not None else None)

    # ----------------------------------------------------------------- scheduler side
    def num_loadable_blocks(self, keys: Iterable[int]) -> int:
        keys = list(keys)
        n = self.host.num_leading(keys) if self.host is not None else 0
        num_in_host = n
        if self.disk is not None:
            while n < len(keys) and keys[n] in self.disk:
                n += 1
        num_local = n
        if self.remote is not None and n < len(keys):
            n += self.remote.num_leading(keys[n:])
        self._last_lookup = (keys[:1], len(keys), num_in_host, num_local)
        return n

    def commit_lookup(self, keys: list[int], num_loading_blocks: int) -> None:
        # The tiers' answers to the scheduler's lookup of these keys, just before: a tier is
        # queried for the keys the tiers above it lacked.
        first, num, num_in_host, num_local = self._last_lookup
        if (first, num) != (keys[:1], len(keys)):
            num_in_host = num_local = 0
        for tier, num_above in ((self.host, 0), (self.disk, num_in_host),
                                (self.remote, num_local)):
            if tier is not None:
                with tier.counters.lock:
                    tier.counters.num_queried_tokens += (len(keys) - num_above) * self.block_size

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
        promoted: list[tuple[Block, torch.Tensor]] = []
        while self.disk is not None and n < len(blocks):
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
        if self.remote is not None and n < len(blocks):
            payloads = self.remote.read(blocks[n:])
            for data in payloads:
                flat = torch.frombuffer(data, dtype=torch.uint8)
                self._to_device(load.block_ids[n], flat)
                promoted.append((blocks[n], flat))
                n += 1
            with self.remote.counters.lock:
                self.remote.counters.num_hit_tokens += len(payloads) * self.block_size
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
        disk = self.disk if self.disk is not None and self.disk.writable else None
        remote = self.remote
        if disk is None and remote is None:
            return
        for save in saves:
            to_disk = disk is not None and save.key not in disk
            if not to_disk and remote is None:
                continue
            # The writer threads need bytes nobody overwrites: one copy they both read.
            buf = torch.empty(self.block_bytes, dtype=torch.uint8)
            self._from_device(save.block_id, buf)
            if to_disk and disk is not None:
                disk.put(save.key, save.parent_key, save.token_ids, buf.numpy())
            if remote is not None:
                remote.put(Block(save.key, save.parent_key, save.token_ids), buf.numpy())

    # ----------------------------------------------------------------- stats, lifecycle
    def stats(self) -> tuple[KVTierStats, ...]:
        tiers = [t.stats() for t in (self.host, self.disk, self.remote) if t is not None]
        return tuple(tiers)

    def close(self) -> None:
        if self.host is not None:
            self.host.close()
        if self.disk is not None:
            self.disk.close()
        if self.remote is not None:
            self.remote.close()
