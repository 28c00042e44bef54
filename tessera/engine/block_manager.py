"""KV cache block accounting with prefix caching. Pure Python (no torch).

The pool holds ``num_blocks`` blocks of ``block_size`` tokens. A block is either in use
(ref_count > 0) or free; free blocks sit in one LRU queue from which allocation pops the
oldest. A free block may still hold cached KV: it keeps its prefix hash until it is popped
for reuse, so a later request with the same prefix can take it back (a cache hit).

Prefix keys chain: the key of full block i is a digest of (key of block i-1, tokens of block
i), so equal keys mean equal whole prefixes (``tessera.kv.keys``); the same keys name blocks in
the tiers outside the pool.
"""

from __future__ import annotations

from collections import OrderedDict

from tessera.engine.sequence import Sequence
from tessera.kv.events import KVEventLog, KVEvents
from tessera.kv.keys import ROOT_KEY, block_key


class BlockManager:
    """Allocates and frees KV blocks for sequences; every operation is O(1) per block."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_keys: list[int | None] = [None] * num_blocks
        # Free blocks in eviction order (front is evicted first). OrderedDict gives O(1)
        # pop-front, append and removal by id, which a cache hit on a free block needs.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # prefix key -> block id
        self._events: KVEventLog | None = None  # kept once someone takes events

    def take_kv_events(self) -> KVEvents:
        """The prefix keys stored in and removed from the cache since the last call; the first
        call lists every key cached now (and says ``cleared``). Events are kept from then on."""
        if self._events is None:
            self._events = KVEventLog(list(self.cached))
        return self._events.take()

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by running sequences (cached free blocks count as free)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_key(self, seq: Sequence, i: int) -> int:
        """Prefix key of full block ``i`` of ``seq``; computed once and kept on the sequence."""
        hashes = seq.block_hashes
        while len(hashes) <= i:
            j = len(hashes)
            parent = hashes[j - 1] if j else ROOT_KEY
            start = j * self.block_size
            hashes.append(block_key(parent, seq.token_ids[start : start + self.block_size]))
        return hashes[i]

    def parent_key(self, seq: Sequence, i: int) -> int:
        """The key of the block before block ``i`` (``ROOT_KEY`` for block 0)."""
        return self.block_key(seq, i - 1) if i else ROOT_KEY

    def block_tokens(self, seq: Sequence, i: int) -> list[int]:
        return seq.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def find_cached_blocks(self, seq: Sequence) -> list[int]:
        """Blocks holding a cached prefix of ``seq``'s tokens; does not change any state.

        At least one token is always left to compute, because the model must run on the last
        token to produce the next one.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block_id = self.cached.get(self.block_key(seq, i))
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(
        self, seq: Sequence, num_new_tokens: int, cached: list[int] | None = None,
        num_loaded_blocks: int = 0,
    ) -> bool:
        """Whether ``num_new_tokens`` more tokens of ``seq`` fit, after taking ``cached`` and
        ``num_loaded_blocks`` fresh blocks for KV loaded from outside the pool."""
        cached = cached or []
        num_needed = self.num_blocks_for(
            seq.num_computed_tokens + (len(cached) + num_loaded_blocks) * self.block_size
            + num_new_tokens
        )
        num_fresh = num_needed - len(seq.block_ids) - len(cached)
        # Cached blocks that are free now leave the free queue when taken.
        num_taken_from_free = sum(1 for b in cached if self.ref_counts[b] == 0)
        return num_fresh <= len(self.free_queue) - num_taken_from_free

    # ------------------------------------------------------------------ changes
    def allocate(
        self, seq: Sequence, num_new_tokens: int, cached: list[int] | None = None,
        num_loaded_blocks: int = 0,
    ) -> None:
        """Give ``seq`` the cached prefix blocks, ``num_loaded_blocks`` fresh blocks for KV
        the caller loads from outside the pool, and enough fresh blocks for the new tokens.

        Callers check ``can_allocate`` first. Cached and loaded blocks are only passed at
        admission, while the sequence holds no blocks; they count as computed tokens (a load
        that fails rolls the sequence back, ``roll_back``).
        """
        if cached or num_loaded_blocks:
            assert not seq.block_ids, "prefix blocks are taken only at admission"
            for block_id in cached or ():
                if self.ref_counts[block_id] == 0:
                    del self.free_queue[block_id]
                self.ref_counts[block_id] += 1
                seq.block_ids.append(block_id)
            for _ in range(num_loaded_blocks):
                seq.block_ids.append(self._pop_free_block())
            seq.num_computed_tokens = len(seq.block_ids) * self.block_size
        num_needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        for _ in range(num_needed - len(seq.block_ids)):
            seq.block_ids.append(self._pop_free_block())

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        key = self.block_keys[block_id]
        if key is not None:
            # Evict: the block's old content is about to be overwritten.
            if self.cached.get(key) == block_id:
                del self.cached[key]
                if self._events is not None:
                    self._events.removed(key)
            self.block_keys[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def register_computed(self, seq: Sequence) -> None:
        """Publish every block of ``seq`` that is now full of computed KV in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(num_full):
            block_id = seq.block_ids[i]
            if self.block_keys[block_id] is not None:
                continue
            key = self.block_key(seq, i)
            # If another block already holds this prefix, keep that one: this block stays
            # private and is recycled first when freed.
            if key not in self.cached:
                self.cached[key] = block_id
                self.block_keys[block_id] = key
                if self._events is not None:
                    self._events.stored(key)

    def roll_back(self, seq: Sequence, num_tokens: int) -> None:
        """Mark only the first ``num_tokens`` of ``seq`` computed (after a failed load). The
        blocks after them stay allocated, unpublished, and are overwritten by recompute."""
        assert num_tokens <= seq.num_computed_tokens
        seq.num_computed_tokens = num_tokens

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past those ``seq``'s tokens need (taken for draft tokens that were
        rejected). They hold no published KV: only computed tokens are published."""
        num_keep = self.num_blocks_for(seq.num_tokens)
        while len(seq.block_ids) > num_keep:
            block_id = seq.block_ids.pop()
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] == 0 and self.block_keys[block_id] is None
            self.free_queue[block_id] = None
            self.free_queue.move_to_end(block_id, last=False)

    def free(self, seq: Sequence) -> None:
        """Return ``seq``'s blocks to the pool; cached content stays reusable until evicted."""
        # Tail blocks are queued first so they are evicted before the shared prefix blocks.
        for block_id in reversed(seq.block_ids):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, "block freed twice"
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None
                if self.block_keys[block_id] is None:
                    # Nothing reusable in it: recycle it before any cached block.
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_ids.clear()
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget all cached prefixes (blocks in use keep their content)."""
        self.cached.clear()
        self.block_keys = [None] * self.num_blocks
        if self._events is not None:
            self._events.cleared()
