"""Continuous-batching scheduler. Pure Python (no torch): plain data in, plain data out.

Every step mixes decodes and prefill chunks under one token budget. Running sequences are
served first, in arrival order; when the pool runs out of blocks the most recently admitted
running sequence is preempted (its blocks freed, its tokens kept) and later recomputed from
its tokens, so no request is ever dropped. Waiting sequences are admitted, with their cached
prefix blocks, while budget, sequence slots and blocks remain.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tessera.config import SchedulerConfig
from tessera.engine.block_manager import BlockManager
from tessera.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """What to run this step: ``num_new_tokens[i]`` tokens of ``seqs[i]``.

    Tokens ``[seq.num_computed_tokens, seq.num_computed_tokens + n)`` are computed; a sequence
    whose step reaches its last token samples one new token.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """Decides, each step, which tokens of which sequences run."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
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
            cached = bm.find_cached_blocks(seq)
            num_cached_tokens = len(cached) * bm.block_size
            num_new = seq.num_tokens - num_cached_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not bm.can_allocate(seq, num_new, cached):
                break
            self.waiting.popleft()
            bm.allocate(seq, num_new, cached)
            if seq.num_preemptions == 0:
                # Count hits once per request, not again on recompute after preemption (even
                # one preempted mid-prompt, before its first token).
                self.num_prefix_queried_tokens += seq.num_tokens
                self.num_prefix_hit_tokens += num_cached_tokens
                seq.num_cached_tokens = num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(num_new)
            budget -= num_new
        return out

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and put it first in line; it recomputes from its tokens."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, out: SchedulerOutput, sampled_token_ids: list[int | None]) -> None:
        """Advance the scheduled sequences after the model ran.

        ``sampled_token_ids[i]`` is the token sampled for ``out.seqs[i]``, or None when its step
        was a prefill chunk that did not reach the end of its tokens.
        """
        bm = self.block_manager
        for seq, num_new, token_id in zip(
            out.seqs, out.num_new_tokens, sampled_token_ids, strict=True
        ):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += num_new
            bm.register_computed(seq)
            if token_id is not None:
                seq.token_ids.append(token_id)
