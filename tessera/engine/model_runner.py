"""Runs one scheduled step on the device.

This is the one place that builds device inputs from scheduler output and the one place that
waits for the device (a single ``tolist`` of the sampled tokens per step; prompt logprobs,
enqueued before it, are copied after it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from tessera.engine import prompt_logprobs
from tessera.engine.decode_stack import DenseDecodeStack
from tessera.engine.prompt_logprobs import PromptLogprobsChunk, PromptRowPlan
from tessera.engine.sampler import Sampler
from tessera.engine.scheduler import SchedulerOutput
from tessera.model.attention import AttentionMetadata, PrefillChunk
from tessera.model.context import StepContext
from tessera.model.dense import DecoderModel


class SampledTokens(NamedTuple):
    """Per scheduled sequence of a step: its sampled token (None for a prefill chunk that
    does not end its prompt), its logprobs entry and its prompt logprobs (None unless
    requested)."""

    tokens: list[int | None]
    logprobs: list[dict[int, float] | None]
    prompt_logprobs: list[PromptLogprobsChunk | None] | None = None
    """None when no sequence of the step asked for prompt logprobs."""
    num_accepted: list[int] | None = None
    """Per sequence, how many of its draft tokens were accepted (they come before its sampled
    token); None when the step verified no draft."""


@dataclass
class StepInputs:
    """Device inputs of one step; token order is decodes first, then prefill chunks."""

    input_ids: torch.Tensor  # [T] int64
    ctx: StepContext
    sample_rows: torch.Tensor  # [S] int64: batch rows whose hidden state is sampled
    sample_seq_indices: list[int]  # index into SchedulerOutput.seqs, per sampled row
    prompt_rows: PromptRowPlan = field(default_factory=PromptRowPlan)
    row_drafts: list[int | None] | None = None
    """Per sampled row, the draft token it verifies (None: a row that samples freely: the
    last row of a drafted sequence, or any row of an undrafted one); None when no sequence
    of the step has a draft."""


class ModelRunner:
    """Owns the KV caches; turns a ``SchedulerOutput`` into sampled tokens."""

    def __init__(
        self,
        model: DecoderModel,
        device: torch.device,
        block_size: int,
        num_blocks: int,
        sampler: Sampler,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.sampler = sampler
        dtype = kv_dtype or model.embed.weight.dtype
        # Zero-filled: masked-out slots are multiplied by 0 in attention and must not be NaN.
        self.kv_caches: list[torch.Tensor | None] = [
            torch.zeros(model.kv_cache_shape(num_blocks, block_size), dtype=dtype, device=device)
            for _ in range(model.spec.num_layers)
        ]
        self.units: list[nn.Module] = model.units()

    @staticmethod
    def kv_bytes_per_block(
        model: DecoderModel, block_size: int, kv_dtype: torch.dtype | None = None
    ) -> int:
        """Bytes one KV block takes over all layers (the cache layout is the model's)."""
        itemsize = (kv_dtype or model.embed.weight.dtype).itemsize
        per_layer = math.prod(model.kv_cache_shape(1, block_size))
        return model.spec.num_layers * per_layer * itemsize

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        num_drafts = out.num_draft_tokens or [0] * len(out.seqs)
        # A sequence verifying a draft runs as decode rows, one per token (its real token,
        # then the draft) at consecutive positions: every row's KV is written before any row
        # attends, so row j attends to exactly the tokens up to its own (causal).
        decodes = [i for i, n in enumerate(out.num_new_tokens) if n == 1 or num_drafts[i]]
        prefills = [i for i, n in enumerate(out.num_new_tokens) if n > 1 and not num_drafts[i]]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_seq_indices: list[int] = []
        tables: list[list[int]] = []
        seq_lens: list[int] = []
        prompt_rows = PromptRowPlan()
        row_drafts: list[int | None] | None = [] if any(num_drafts) else None
        for i in decodes:
            seq = out.seqs[i]
            start = seq.num_computed_tokens
            drafts = seq.draft_token_ids if num_drafts[i] else []
            for j, token in enumerate([seq.token_ids[start], *drafts]):
                pos = start + j
                input_ids.append(token)
                positions.append(pos)
                slots.append(seq.block_ids[pos // bs] * bs + pos % bs)
                tables.append(seq.block_ids)
                seq_lens.append(pos + 1)
            if not drafts:
                # A one-token step may be a prompt chunk (chunked prefill's leftover budget).
                prompt_rows.add(i, seq, start, 1, len(input_ids) - 1)
            if start + 1 == seq.num_tokens:
                # Row j's logits verify draft token j; the last row's are sampled freely.
                first = len(input_ids) - 1 - len(drafts)
                sample_rows.extend(range(first, len(input_ids)))
                sample_seq_indices.extend([i] * (1 + len(drafts)))
                if row_drafts is not None:
                    row_drafts.extend([*drafts, None])
        chunks: list[PrefillChunk] = []
        for i in prefills:
            seq, n = out.seqs[i], out.num_new_tokens[i]
            start = seq.num_computed_tokens
            prompt_rows.add(i, seq, start, n, len(input_ids))
            chunks.append(
                PrefillChunk(
                    start=len(input_ids),
                    num_tokens=n,
                    num_context_tokens=start,
                    block_ids=torch.tensor(
                        seq.block_ids[: -(-(start + n) // bs)], dtype=torch.int64,
                        device=self.device,
                    ),
                )
            )
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            blocks = seq.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            if start + n == seq.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_seq_indices.append(i)
                if row_drafts is not None:
                    row_drafts.append(None)

        dev = self.device
        block_tables = seq_len_t = None
        if decodes:
            width = max(len(t) for t in tables)
            block_tables = torch.tensor(
                [t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=dev
            )
            seq_len_t = torch.tensor(seq_lens, dtype=torch.int64, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decode_tokens=len(seq_lens),
            decode_block_tables=block_tables,
            decode_seq_lens=seq_len_t,
            prefills=chunks,
        )
        ctx = StepContext(
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            attn=meta,
            kv_caches=self.kv_caches,
        )
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=dev),
            ctx=ctx,
            sample_rows=torch.tensor(sample_rows, dtype=torch.int64, device=dev),
            sample_seq_indices=sample_seq_indices,
            prompt_rows=prompt_rows,
            row_drafts=row_drafts,
        )

    @functools.cached_property
    def decode_stack(self) -> DenseDecodeStack | None:
        """All units as one native call for few-row decode steps, if the model allows it
        (built on first use: after the loader's rotary tables and the linears' packing)."""
        return DenseDecodeStack.from_units(self.units)

    @torch.inference_mode()
    def hidden_states(self, inputs: StepInputs) -> torch.Tensor:
        """The last unit's output [T, D] for every token of the step."""
        hidden = self.model.embed_tokens(inputs.input_ids)  # [T, D]
        stack = self.decode_stack
        if stack is not None and stack.applies(hidden, inputs.ctx):
            return stack(hidden, inputs.ctx)  # the units' ops, one call
        for unit in self.units:
            hidden = unit(hidden, inputs.ctx)
        return hidden

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [S, V] (float32) of the sampled rows."""
        return self.model.compute_logits(self.hidden_states(inputs)[inputs.sample_rows])

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> SampledTokens:
        """Run the step; per scheduled sequence, the sampled token (None for a prefill chunk
        that does not end its prompt), its logprobs entry and its prompt logprobs."""
        inputs = self.prepare(out)
        hidden = self.hidden_states(inputs)
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        plan = inputs.prompt_rows
        # Enqueued before the sampler's sync, copied after it: no sync of its own.
        prompt = prompt_logprobs.compute(self.model, hidden, plan) if plan.rows else None
        sampled = self.sample(out, logits, inputs.sample_seq_indices, inputs.row_drafts)
        if prompt is None:
            return sampled
        return sampled._replace(prompt_logprobs=prompt.to_host(len(out.seqs)))

    def sample(
        self, out: SchedulerOutput, logits: torch.Tensor, sample_seq_indices: list[int],
        row_drafts: list[int | None] | None = None,
    ) -> SampledTokens:
        """Sample the rows of ``logits`` [S, V] (``row_drafts``: see ``StepInputs``); per
        scheduled sequence, its token (None for a prefill chunk that does not end its
        prompt), logprobs entry and, with drafts, how many of its draft tokens held."""
        seqs = [out.seqs[i] for i in sample_seq_indices]
        sampled = self.sampler.sample(logits, seqs, row_drafts)
        tokens: list[int | None] = [None] * len(out.seqs)
        logprobs: list[dict[int, float] | None] = [None] * len(out.seqs)
        num_accepted: list[int] | None = None
        if sampled.accepted is not None:
            # A sequence's rows are in order; its first row that does not accept a draft
            # (its last row has none to accept) gives its token.
            num_accepted = [0] * len(out.seqs)
            decided = [False] * len(out.seqs)
            for row, i in enumerate(sample_seq_indices):
                if decided[i]:
                    continue
                if sampled.accepted[row]:
                    num_accepted[i] += 1
                else:
                    decided[i] = True
                    tokens[i] = sampled.token_ids[row]
                    logprobs[i] = sampled.logprobs[row]
            return SampledTokens(tokens, logprobs, None, num_accepted)
        for row, i in enumerate(sample_seq_indices):
            tokens[i] = sampled.token_ids[row]
            logprobs[i] = sampled.logprobs[row]
        return SampledTokens(tokens, logprobs)
