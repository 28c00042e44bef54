"""Continuous-batching scheduler. Pure Python (no torch): plain data in, plain data out.

Every step mixes decodes and prefill chunks under one token budget. Running sequences are
served first, in arrival order; when the pool runs out of blocks the most recently admitted
running sequence is preempted (its blocks freed, its tokens kept) and later recomputed from
its tokens, so no request is ever dropped. Waiting sequences are admitted, with their cached
prefix blocks, while budget, sequence slots and blocks remain.

With a drafter (speculative decoding), a decoding sequence also runs the draft tokens proposed
for it (``SchedulerOutput.num_draft_tokens``); ``update`` keeps the accepted ones, and the
blocks taken for the rejected ones go back to the pool. Drafts never preempt anything.

With a KV connector, admission also takes the blocks after the device hits that the
connector can load (``SchedulerOutput.loads``), and ``update`` hands every block that became
full of computed KV to it (``SchedulerOutput.saves``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tessera.config import SchedulerConfig
from tessera.engine.block_manager import BlockManager
from tessera.engine.ngram_drafter import NgramDrafter
from tessera.engine.sequence import Sequence, SequenceStatus
from tessera.kv.connector import BlockLoad, BlockSave, KVConnectorScheduler, LoadResult


@dataclass
class SchedulerOutput:
    """What to run this step: ``num_new_tokens[i]`` tokens of ``seqs[i]``.

    Tokens ``[seq.num_computed_tokens, seq.num_computed_tokens + n)`` are computed; a sequence
    whose step reaches its last token samples one new token. The last ``num_draft_tokens[i]``
    of those are ``seqs[i].draft_token_ids``, verified in the step: every one of its rows is
    sampled.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_draft_tokens: list[int] = field(default_factory=list)
    """Per sequence (empty: none drafted)."""
    preempted: list[Sequence] = field(default_factory=list)
    loads: list[BlockLoad] = field(default_factory=list)
    """KV to load before the step runs, for the sequences ``load_seqs`` (same order)."""
    load_seqs: list[Sequence] = field(default_factory=list)
    saves: list[BlockSave] = field(default_factory=list)
    """Blocks that became full of computed KV in this step (filled by ``update``)."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """Decides, each step, which tokens of which sequences run."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 connector: KVConnectorScheduler | None = None,
                 drafter: NgramDrafter | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.connector = connector
        self.drafter = drafter
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prefix_queried_tokens = 0
        self.num_prefix_hit_tokens = 0

    # ----------------------------------------------------------------- requests
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` (stop, length, abort) and return its blocks to the pool."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ----------------------------------------------------------------- one step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            drafts = self._drafts(seq, budget)
            num_new += len(drafts)
            while not bm.can_allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, num_new)
                out.seqs.append(seq)
                out.num_new_tokens.append(num_new)
                out.num_draft_tokens.append(len(drafts))
                budget -= num_new
                i += 1

        # Admitting new work right after a preemption would only thrash the pool.
        while (
            self.waiting
            and budget > 0
            and not out.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            # A prompt whose logprobs are asked for runs in full: cached KV has no logits.
            cached = [] if seq.needs_prompt_logprobs else bm.find_cached_blocks(seq)
            num_loaded = self._num_loadable_blocks(seq, len(cached))
            num_cached_tokens = (len(cached) + num_loaded) * bm.block_size
            num_new = seq.num_tokens - num_cached_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not bm.can_allocate(seq, num_new, cached, num_loaded):
                break
            self.waiting.popleft()
            bm.allocate(seq, num_new, cached, num_loaded)
            if self.connector is not None:
                self._plan_loads(out, seq, len(cached), num_loaded)
            if seq.num_preemptions == 0:
                # Count hits once per request, not again on recompute after preemption (even
                # one preempted mid-prompt, before its first token).
                self.num_prefix_queried_tokens += seq.num_tokens
                self.num_prefix_hit_tokens += len(cached) * bm.block_size
                seq.num_cached_tokens = num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(num_new)
            out.num_draft_tokens.append(0)
            budget -= num_new
        return out

    def _drafts(self, seq: Sequence, budget: int) -> list[int]:
        """Set and return the draft ``seq`` runs this step: none unless it is decoding and
        the drafter has one that fits the budget and the free blocks."""
        seq.draft_token_ids = []
        if self.drafter is None or seq.num_computed_tokens != seq.num_tokens - 1:
            return []
        drafts = self.drafter.propose(seq, budget - 1)
        if drafts and self.block_manager.can_allocate(seq, 1 + len(drafts)):
            seq.draft_token_ids = drafts
        return seq.draft_token_ids

    # ----------------------------------------------------------------- KV connector
    def _num_loadable_blocks(self, seq: Sequence, num_cached_blocks: int) -> int:
        """Blocks after the device hits the connector can load (one token is always left
        to compute, as for device hits)."""
        if self.connector is None or seq.needs_prompt_logprobs:
            return 0
        bm = self.block_manager
        num_full = (seq.num_tokens - 1) // bm.block_size
        keys = (bm.block_key(seq, i) for i in range(num_cached_blocks, num_full))
        return self.connector.num_loadable_blocks(keys)

    def _plan_loads(self, out: SchedulerOutput, seq: Sequence, first: int, num: int) -> None:
        assert self.connector is not None
        bm = self.block_manager
        num_full = (seq.num_tokens - 1) // bm.block_size
        self.connector.commit_lookup([bm.block_key(seq, i) for i in range(first, num_full)], num)
        # Blocks stored before admission (device hits and loads) are not offered back.
        seq.num_saved_blocks = first + num
        if num:
            out.loads.append(BlockLoad(
                keys=seq.block_hashes[first : first + num],
                block_ids=seq.block_ids[first : first + num],
                token_ids=[bm.block_tokens(seq, i) for i in range(first, first + num)],
                parent_key=bm.parent_key(seq, first),
            ))
            out.load_seqs.append(seq)

    def drop_failed_loads(self, out: SchedulerOutput, result: LoadResult) -> SchedulerOutput:
        """The step to run after ``result``: each sequence whose load fell short is rolled
        back to its first block that did not load and leaves this step (it recomputes from
        there in the next one, its blocks kept); the other sequences run as planned."""
        bm = self.block_manager
        dropped: set[int] = set()
        for seq, load, num_ok in zip(out.load_seqs, out.loads, result.num_loaded_blocks,
                                     strict=True):
            if num_ok < len(load.keys):
                first = seq.num_computed_tokens // bm.block_size - len(load.keys)
                bm.roll_back(seq, (first + num_ok) * bm.block_size)
                seq.num_saved_blocks = first + num_ok
                seq.num_cached_tokens -= (len(load.keys) - num_ok) * bm.block_size
                dropped.add(seq.seq_id)
        kept = [i for i, seq in enumerate(out.seqs) if seq.seq_id not in dropped]
        return SchedulerOutput(
            seqs=[out.seqs[i] for i in kept],
            num_new_tokens=[out.num_new_tokens[i] for i in kept],
            num_draft_tokens=[out.num_draft_tokens[i] for i in kept] if out.num_draft_tokens
            else [],
            preempted=out.preempted,
        )

    def _plan_saves(self, out: SchedulerOutput, seq: Sequence) -> None:
        bm = self.block_manager
        num_full = seq.num_computed_tokens // bm.block_size
        for i in range(seq.num_saved_blocks, num_full):
            out.saves.append(BlockSave(
                key=bm.block_key(seq, i), block_id=seq.block_ids[i],
                token_ids=bm.block_tokens(seq, i), parent_key=bm.parent_key(seq, i),
            ))
        seq.num_saved_blocks = max(seq.num_saved_blocks, num_full)

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and put it first in line; it recomputes from its tokens."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.draft_token_ids = []
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, out: SchedulerOutput, sampled_token_ids: list[int | None],
               num_accepted: list[int] | None = None) -> None:
        """Advance the scheduled sequences after the model ran.

        ``sampled_token_ids[i]`` is the token sampled for ``out.seqs[i]``, or None when its step
        was a prefill chunk that did not reach the end of its tokens. A sequence that verified
        a draft gains its first ``num_accepted[i]`` draft tokens and then the sampled one; the
        KV of the rest is dropped (its positions are past the computed ones, so they are
        rewritten before anything reads them) and the blocks only they used are freed.
        """
        bm = self.block_manager
        num_drafts = out.num_draft_tokens or [0] * len(out.seqs)
        for i, (seq, num_new, token_id) in enumerate(zip(
            out.seqs, out.num_new_tokens, sampled_token_ids, strict=True
        )):
            num_draft = num_drafts[i]
            if seq.status is not SequenceStatus.RUNNING:
                seq.draft_token_ids = []
                continue  # aborted while the step ran
            num_ok = 0
            if num_draft:
                assert num_accepted is not None, "a drafted step needs num_accepted"
                assert self.drafter is not None
                num_ok = num_accepted[i]
                seq.token_ids.extend(seq.draft_token_ids[:num_ok])
                seq.draft_token_ids = []
                self.drafter.observe(seq, num_draft, num_ok)
            seq.num_computed_tokens += num_new - num_draft + num_ok
            bm.register_computed(seq)
            if self.connector is not None:
                self._plan_saves(out, seq)
            if token_id is not None:
                seq.token_ids.append(token_id)
            if num_draft:
                bm.trim(seq)
