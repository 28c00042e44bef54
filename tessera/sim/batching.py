"""Per-group decode batching and KV accounting, kept behind a narrow interface.

Each data-parallel attention group owns ``slots_per_group`` sequence slots and a KV budget in
tokens. New sequences go to the group with the lowest KV usage among those with a free slot and
room for the sequence's final length (decode DP load balancing as in xDeepServe, arXiv
2508.02520). State is held in numpy arrays so one step advances every sequence at once.
"""

from __future__ import annotations

import numpy as np


class DecodeSlots:
    """Slots and KV usage of every data-parallel group of one decode pool."""

    def __init__(self, num_groups: int, slots_per_group: int, kv_capacity_tokens: int) -> None:
        self.num_groups = num_groups
        self.slots_per_group = slots_per_group
        self.kv_capacity_tokens = kv_capacity_tokens
        shape = (num_groups, slots_per_group)
        self.request = np.full(shape, -1, dtype=np.int64)
        self.context = np.zeros(shape, dtype=np.float64)
        self.remaining = np.zeros(shape, dtype=np.float64)
        self.reserved = np.zeros(num_groups, dtype=np.float64)
        self.num_active = np.zeros(num_groups, dtype=np.int64)
        self.ready = np.zeros(shape, dtype=bool)
        self._where: dict[int, tuple[int, int]] = {}

    @property
    def total_active(self) -> int:
        """Sequences currently decoding."""
        return int(self.num_active.sum())

    def can_ever_fit(self, final_tokens: int) -> bool:
        """Whether a sequence of ``final_tokens`` fits an empty group."""
        return final_tokens <= self.kv_capacity_tokens

    def admit(self, request_id: int, context_tokens: int, remaining_tokens: int,
              ready: bool = True) -> int:
        """Place one sequence and return its group, or -1 when no group has a slot and KV room.

        A sequence admitted with ``ready=False`` holds its slot (its prompt is being prefilled
        in that group) but does not decode until :meth:`mark_ready`.
        """
        final = float(context_tokens + remaining_tokens)
        ok = (self.num_active < self.slots_per_group) & (
            self.reserved + final <= self.kv_capacity_tokens)
        if not ok.any():
            return -1
        usage = np.where(ok, self.reserved, np.inf)
        g = int(np.argmin(usage))
        s = int(np.argmin(self.request[g] >= 0))
        self.request[g, s] = request_id
        self.context[g, s] = context_tokens
        self.remaining[g, s] = remaining_tokens
        self.reserved[g] += final
        self.num_active[g] += 1
        self.ready[g, s] = ready
        self._where[request_id] = (g, s)
        return g

    def mark_ready(self, request_id: int) -> None:
        """Let a sequence admitted with ``ready=False`` start decoding."""
        self.ready[self._where[request_id]] = True

    def group_loads(self) -> tuple[np.ndarray, np.ndarray]:
        """(sequences, total context tokens) per group."""
        active = self.ready & (self.request >= 0)
        return active.sum(axis=1).astype(np.float64), (self.context * active).sum(axis=1)

    def advance(self, generated: np.ndarray) -> tuple[np.ndarray, float]:
        """Add ``generated`` tokens (per slot) to active sequences.

        Returns the ids of sequences that finished (their slots are freed) and the number of
        tokens actually emitted (never past a sequence's requested length).
        """
        active = self.ready & (self.request >= 0)
        emitted = np.minimum(np.where(active, generated, 0.0), self.remaining)
        self.remaining -= emitted
        self.context += emitted
        done = active & (self.remaining <= 0)
        finished = self.request[done].copy()
        if finished.size:
            g_idx = np.nonzero(done)[0]
            final = self.context[done]
            np.subtract.at(self.reserved, g_idx, final)
            np.subtract.at(self.num_active, g_idx, 1)
            self.request[done] = -1
            self.ready[done] = False
            for rid in finished.tolist():
                del self._where[rid]
            self.context[done] = 0.0
            self.remaining[done] = 0.0
        return finished, float(emitted.sum())
