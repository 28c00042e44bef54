"""Prompt logprobs: the log-probability the model gave each prompt token, and the top-N.

The hidden state at prompt position ``p`` predicts token ``p + 1``, so a prefill chunk over
positions ``[start, start + n)`` yields the entries of tokens ``[start + 1, start + n + 1)``
(none past the prompt: the last prompt position is the sampled row). ``PromptRowPlan`` is
filled while the runner builds a step's inputs; ``compute`` runs on the device, before the
sampler's sync; ``PromptLogprobs.to_host`` brings every row of the step over in one transfer,
after that sync, so it waits on no further device work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tessera.engine.sequence import Sequence
from tessera.model.dense import DecoderModel

ROWS_PER_SLICE = 256
"""Prompt rows whose full-vocabulary logits exist at once: bounds the extra device memory
to this many rows times the vocabulary, however long the chunk."""


@dataclass
class PromptLogprobsChunk:
    """The entries of prompt tokens ``[first_token, first_token + len(entries))`` of one
    sequence, computed in one step."""

    first_token: int
    entries: list[dict[int, float]]
    """Per token: its log-probability and those of the top-N tokens at its position."""
    ranks: list[int]
    """Per token: its rank among the vocabulary at its position (1 = most likely)."""


@dataclass
class PromptRowPlan:
    """Which batch rows of a step give prompt logprobs, and for which tokens."""

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    """The prompt token each row predicts."""
    spans: list[tuple[int, int, int, int]] = field(default_factory=list)
    """Per sequence with rows: (index in the step's sequences, first prompt token,
    number of rows, top-N it asked for); its rows are consecutive in ``rows``."""

    def add(self, seq_index: int, seq: Sequence, start: int, num_tokens: int,
            first_row: int) -> None:
        """Plan the rows of ``seq``'s chunk over positions ``[start, start + num_tokens)``,
        whose first token is batch row ``first_row``; only tokens still lacking entries
        (a sequence preempted mid-prompt recomputes positions it already has)."""
        if seq.prompt_logprobs is None or seq.params.prompt_logprobs is None:
            return
        lo = max(start, len(seq.prompt_logprobs) - 1)
        hi = min(start + num_tokens, seq.num_prompt_tokens - 1)
        if lo >= hi:
            return
        self.rows.extend(range(first_row + lo - start, first_row + hi - start))
        self.targets.extend(seq.token_ids[lo + 1 : hi + 1])
        self.spans.append((seq_index, lo + 1, hi - lo, seq.params.prompt_logprobs))


@dataclass
class PromptLogprobs:
    """A step's prompt logprobs, still on the device: per planned row, the token's
    log-probability, its rank, then the top-N log-probabilities and ids (float64 holds the
    ids and ranks exactly), so one copy brings everything to the host."""

    packed: torch.Tensor  # [R, 2 + 2 * num_top] float64
    num_top: int
    plan: PromptRowPlan

    def to_host(self, num_seqs: int) -> list[PromptLogprobsChunk | None]:
        """Per sequence of the step (``num_seqs`` of them): its chunk of entries, or None."""
        rows: list[list[float]] = self.packed.tolist()
        k = self.num_top
        chunks: list[PromptLogprobsChunk | None] = [None] * num_seqs
        offset = 0
        for seq_index, first_token, num_rows, seq_top in self.plan.spans:
            entries: list[dict[int, float]] = []
            ranks: list[int] = []
            for r, target in zip(rows[offset : offset + num_rows],
                                 self.plan.targets[offset : offset + num_rows], strict=True):
                entry = {target: r[0]}
                for val, tid in zip(r[2 : 2 + seq_top], r[2 + k : 2 + k + seq_top], strict=True):
                    entry.setdefault(int(tid), val)
                entries.append(entry)
                ranks.append(int(r[1]))
            chunks[seq_index] = PromptLogprobsChunk(first_token, entries, ranks)
            offset += num_rows
        return chunks


def compute(model: DecoderModel, hidden: torch.Tensor, plan: PromptRowPlan) -> PromptLogprobs:
    """Enqueue the planned rows' logprobs on the device; ``hidden`` is the step's [T, D]."""
    dev = hidden.device
    rows = torch.tensor(plan.rows, dtype=torch.int64, device=dev)
    targets = torch.tensor(plan.targets, dtype=torch.int64, device=dev)
    num_top = max(top for *_, top in plan.spans)
    parts = []
    for lo in range(0, len(plan.rows), ROWS_PER_SLICE):
        sl = slice(lo, lo + ROWS_PER_SLICE)
        logprobs = torch.log_softmax(model.compute_logits(hidden[rows[sl]]), dim=-1)  # [r, V]
        chosen = logprobs.gather(1, targets[sl].unsqueeze(1))  # [r, 1]
        # Ties share the best rank, as vLLM counts it.
        rank = (logprobs > chosen).sum(dim=1, keepdim=True) + 1  # [r, 1]
        vals, ids = logprobs.topk(num_top, dim=-1)  # [r, k]; k = 0 gives empty columns
        parts.append(torch.cat([chosen.double(), rank.double(), vals.double(), ids.double()],
                               dim=1))
    return PromptLogprobs(torch.cat(parts), num_top, plan)
