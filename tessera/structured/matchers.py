"""Each constrained sequence's place in its grammar, and the token mask of a step's rows.

The sampler asks ``mask_logits`` before it samples (rows of unconstrained sequences are left
alone) and ``accept`` after, with the tokens the step chose. Masks are computed on the CPU
into one bitmask for the step (a bit per token, 32 per int32 word) and applied to the
logits in one batched operation on their device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as SequenceABC
from typing import Protocol

import llguidance
import llguidance.torch
import torch

from tessera.sampling_params import SamplingParams
from tessera.structured.compiler import GrammarCompiler

logger = logging.getLogger(__name__)


class ConstrainedSeq(Protocol):
    seq_id: int
    params: SamplingParams


class GrammarMatchers:
    """Matchers by sequence id, over one compiler."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._matchers: dict[int, llguidance.LLMatcher] = {}
        self._shifts: torch.Tensor | None = None

    def _matcher(self, seq: ConstrainedSeq) -> llguidance.LLMatcher:
        m = self._matchers.get(seq.seq_id)
        if m is None:
            assert seq.params.structured is not None
            m = self._matchers[seq.seq_id] = self.compiler.matcher(seq.params.structured)
        return m

    def mask_logits(self, logits: torch.Tensor, seqs: SequenceABC[ConstrainedSeq]) -> None:
        """In place on logits [S, V]: -inf for every token a constrained row's grammar does not
        allow next (only end-of-sequence once the grammar is complete)."""
        rows = [i for i, s in enumerate(seqs) if s.params.structured is not None]
        if not rows:
            return
        vocab = logits.shape[1]
        bitmask = llguidance.torch.allocate_token_bitmask(len(rows), vocab)  # [R, ceil(V/32)]
        for k, i in enumerate(rows):
            m = self._matcher(seqs[i])
            if m.is_error():
                # A matcher in error (it cannot be: the mask kept every token valid) must not
                # leave a row with nothing to sample: end the sequence.
                logger.warning("grammar matcher error, ending the sequence: %s", m.get_error())
                bitmask[k].zero_()
                eos = self.compiler.tokenizer.eos_token
                bitmask[k, eos // 32] = 1 << (eos % 32)
            else:
                llguidance.torch.fill_next_token_bitmask(m, bitmask, k)
        if self._shifts is None or self._shifts.device != logits.device:
            self._shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        words = bitmask.to(logits.device, non_blocking=True)
        allowed = (words.unsqueeze(-1) >> self._shifts) & 1  # [R, W, 32]
        allowed = allowed.view(len(rows), -1)[:, :vocab].bool()  # [R, V]
        index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))

    def accept(self, seqs: SequenceABC[ConstrainedSeq], token_ids: list[int]) -> None:
        """Advance the constrained rows' matchers by the tokens the step sampled."""
        for seq, token in zip(seqs, token_ids, strict=True):
            if seq.params.structured is None:
                continue
            m = self._matcher(seq)
            if not m.is_error() and not m.consume_token(token):
                logger.warning("a sampled token left its grammar: %s", m.get_error())

    def release(self, seq_id: int) -> None:
        self._matchers.pop(seq_id, None)
