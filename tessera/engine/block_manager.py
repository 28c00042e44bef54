"""KV cache block accounting with prefix caching. Pure Python (no torch).

The pool holds ``num_blocks`` blocks of ``block_size`` tokens. A block is either in use
(ref_count > 0) or free; free blocks sit in one LRU queue from which allocation pops the
oldest. A free block may still hold cached KV: it keeps its prefix hash until it is popped
for reuse, so a later request with the same prefix can take it back (a cache hit).

Prefix hashes chain: the key of full block i is ``hash((key of block i-1, tokens of block i))``,
so equal keys mean equal whole prefixes (up to a 64-bit hash collision, which we accept as
vLLM does with its default hash).
"""

from __future__ import annotations

from collections import OrderedDict

from tessera.engine.sequence import Sequence

_ROOT_HASH = 0x7E55E7A


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

    def _block_key(self, seq: Sequence, i: int) -> int:
        """Prefix key of full block ``i`` of ``seq``; computed once and kept on the sequence."""
        hashes = seq.block_hashes
        while len(hashes) <= i:
            j = len(hashes)
            parent = hashes[j - 1] if j else _ROOT_HASH
            start = j * self.block_size
            hashes.append(hash((parent, tuple(seq.token_ids[start : start + self.block_size]))))
        return hashes[i]

    def find_cached_blocks(self, seq: Sequence) -> list[int]:
        """Blocks holding a cached prefix of ``seq``'s tokens; does not change any state.

        At least one token is always left to compute, because the model must run on the last
        token to produce the next one.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block_id = self.cached.get(self._block_key(seq, i))
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(
        self, seq: Sequence, num_new_tokens: int, cached: list[int] | None = None
    ) -> bool:
        """Whether ``num_new_tokens`` more tokens of ``seq`` fit, after taking ``cached``."""
        cached = cached or []
        num_needed = self.num_blocks_for(
            seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        )
        num_fresh = num_needed - len(seq.block_ids) - len(cached)
        # Cached blocks that are free now leave the free queue when taken.
        num_taken_from_free = sum(1 for b in cached if self.ref_counts[b] == 0)
        return num_fresh <= len(self.free_queue) - num_taken_from_free

    # ------------------------------------------------------------------ changes
    def allocate(
        self, seq: Sequence, num_new_tokens: int, cached: list[int] | None = None
    ) -> None:
        """Give ``seq`` the cached prefix blocks and enough fresh blocks for the new tokens.

        Callers check ``can_allocate`` first. Cached blocks are only passed at admission,
        while the sequence holds no blocks; they count as computed tokens.
        """
        if cached:
            assert not seq.block_ids, "cached prefix blocks are taken only at admission"
            for block_id in cached:
                if self.ref_counts[block_id] == 0:
                    del self.free_queue[block_id]
                self.ref_counts[block_id] += 1
                seq.block_ids.append(block_id)
            seq.num_computed_tokens = len(cached) * self.block_size
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
            key = self._block_key(seq, i)
            # If another block already holds this prefix, keep that one: this block stays
            # private and is recycled first when freed.
            if key not in self.cached:
                self.cached[key] = block_id
                self.block_keys[block_id] = key

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
