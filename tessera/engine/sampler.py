"""Token sampling for a batch of sequences with per-request parameters.

Random rows sample by the exponential race (``argmax(p / q)`` with ``q ~ Exp(1)``), which
draws exactly from ``p``. A request with a seed draws its ``q`` from its own generator, so
its tokens do not depend on what else is in the batch.

A row that verifies a draft token ``d`` (speculative decoding) accepts it with probability
``p(d)`` (a greedy row: when ``d`` is its argmax) and otherwise samples from ``p`` with ``d``
removed, which is ``max(p - q, 0)`` renormalized for a draft that proposes ``d`` with
certainty. So each token is distributed exactly as without the draft (Leviathan et al., 2023,
arXiv 2211.17192, for a deterministic drafter), and greedy output is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.engine.sequence import Sequence
from tessera.model.kernels.argmax import row_argmax
from tessera.sampling_params import SamplingParams
from tessera.structured.matchers import GrammarMatchers


@dataclass
class SamplerOutput:
    token_ids: list[int]
    """One per input row."""
    logprobs: list[dict[int, float] | None]
    """Per row: sampled token and top-N alternatives with their log-probabilities, if asked."""
    accepted: list[bool] | None = None
    """Per row, whether it accepted its draft token (False for a row without one); None when
    no row had one."""


class Sampler:
    def __init__(
        self, device: torch.device, seed: int, grammars: GrammarMatchers | None = None
    ) -> None:
        """``grammars`` follows constrained sequences (None: the engine refuses them)."""
        self.device = device
        self.grammars = grammars
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._seq_generators: dict[int, torch.Generator] = {}

    def _generator_for(self, seq: Sequence) -> torch.Generator:
        g = self._seq_generators.get(seq.seq_id)
        if g is None:
            assert seq.params.seed is not None
            g = torch.Generator(device=self.device)
            # Completion i of an n>1 request gets its own stream, derived from the seed; modulo
            # 2**64, the generator's range, any valid seed gives a valid stream for any i (and
            # a negative seed the stream torch gives its two's complement).
            g.manual_seed((seq.params.seed + 1_000_003 * seq.index) % 2**64)
            self._seq_generators[seq.seq_id] = g
        return g

    def release(self, seq: Sequence) -> None:
        self._seq_generators.pop(seq.seq_id, None)
        if self.grammars is not None:
            self.grammars.release(seq.seq_id)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence],
               drafts: list[int | None] | None = None) -> SamplerOutput:
        """logits: [S, V] float32, one row per entry of ``seqs`` (a sequence verifying a draft
        has several rows); ``drafts[i]`` is the draft token row i verifies, if any."""
        if not seqs:
            return SamplerOutput([], [])
        params = [s.params for s in seqs]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        constrained = self.grammars is not None and any(p.structured for p in params)
        biased = any(p.logit_bias for p in params)
        if constrained or biased or any(p.has_penalties for p in params):
            # Logprobs above are the model's own; what follows changes what may be sampled.
            logits = logits.clone()
            for i, seq in enumerate(seqs):
                if seq.params.has_penalties:
                    _apply_penalties(logits[i], seq)
                if seq.params.logit_bias:
                    _apply_logit_bias(logits[i], seq.params.logit_bias)
            if constrained:
                assert self.grammars is not None
                self.grammars.mask_logits(logits, seqs)

        draft_rows = ([] if drafts is None else
                      [(row, d) for row, d in enumerate(drafts) if d is not None])
        accept_t: torch.Tensor | None = None  # [S] bool, where sampling decides acceptance
        if all(p.greedy for p in params):
            token_t = row_argmax(logits)
        else:
            token_t, accept_t = self._sample_random(logits, seqs, draft_rows)

        # The step's device sync: one copy, of the tokens and any random acceptances.
        token_ids: list[int]
        random_ok: list[int] | None = None
        if accept_t is None:
            token_ids = token_t.tolist()
        else:
            token_ids, random_ok = torch.stack([token_t, accept_t.long()]).tolist()
        accepted: list[bool] | None = None
        if draft_rows:
            accepted = [False] * len(seqs)
            for row, d in draft_rows:
                if params[row].greedy:
                    accepted[row] = token_ids[row] == d
                else:
                    assert random_ok is not None
                    accepted[row] = bool(random_ok[row])
        if constrained:
            assert self.grammars is not None
            self.grammars.accept(seqs, token_ids)
        logprobs: list[dict[int, float] | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, token_t, token_ids, params)
        return SamplerOutput(token_ids, logprobs, accepted)

    def _sample_random(
        self, logits: torch.Tensor, seqs: list[Sequence], draft_rows: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens [S] and, with ``draft_rows`` ((row, draft token) pairs), whether each row
        accepts its draft [S] bool (meaningful on random rows with a draft)."""
        params = [s.params for s in seqs]
        dev = logits.device
        num_rows, vocab = logits.shape
        greedy = torch.tensor([p.greedy for p in params], device=dev)
        temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)
        x = logits / temps.unsqueeze(1)
        top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        if any(k < vocab for k in top_ks) or any(p.top_p < 1.0 for p in params):
            sorted_x, order = x.sort(dim=-1, descending=True)
            rank = torch.arange(vocab, device=dev).unsqueeze(0)
            k_t = torch.tensor(top_ks, device=dev).unsqueeze(1)
            sorted_x = sorted_x.masked_fill(rank >= k_t, float("-inf"))
            top_p = torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1)
            probs = sorted_x.softmax(dim=-1)
            # Drop a token when the tokens before it already reach top_p (keeps at least one).
            drop = (probs.cumsum(dim=-1) - probs) >= top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.empty_like(x).scatter_(1, order, sorted_x)
        min_ps = [p.min_p for p in params]
        if any(m > 0 for m in min_ps):
            probs = x.softmax(dim=-1)
            floor = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_ps, device=dev).unsqueeze(1)
            x = x.masked_fill(probs < floor, float("-inf"))
        probs = x.softmax(dim=-1)
        accept: torch.Tensor | None = None
        if draft_rows:
            rows_t = torch.tensor([r for r, _ in draft_rows], dtype=torch.int64, device=dev)
            ids_t = torch.tensor([d for _, d in draft_rows], dtype=torch.int64, device=dev)
            u = torch.rand(num_rows, generator=self.generator, device=dev)  # [S]
            for r, _ in draft_rows:
                if seqs[r].params.seed is not None:
                    u[r] = torch.rand(1, generator=self._generator_for(seqs[r]), device=dev)[0]
            p_draft = torch.zeros(num_rows, device=dev)
            p_draft[rows_t] = probs[rows_t, ids_t]
            accept = u < p_draft  # [S]
            # Where the draft is rejected, the token comes from p without it.
            probs = probs.index_put((rows_t, ids_t), torch.zeros((), device=dev))
        q = _exponential(probs.shape, self.generator, dev)  # [S, V]
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None and not seq.params.greedy:
                q[i] = _exponential((vocab,), self._generator_for(seq), dev)
        sampled = row_argmax(probs / q)
        return torch.where(greedy, row_argmax(logits), sampled), accept


def _exponential(
    shape: tuple[int, ...] | torch.Size, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Exp(1) noise as -log(U), U ~ Uniform[0, 1): the same distribution as ``exponential_``,
    which on CPU draws one element at a time and is several times slower.
    U = 0 gives +inf, which only removes that token from the race."""
    return torch.rand(shape, generator=generator, device=device).log_().neg_()


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    """In place on one row of logits [V]: repetition (prompt and output), then
    frequency and presence (output only), as defined by vLLM / OpenAI."""
    p = seq.params
    dev = row.device
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.int64, device=dev)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and seq.num_output_tokens:
        out = torch.tensor(seq.output_token_ids, dtype=torch.int64, device=dev)
        counts = torch.bincount(out, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _apply_logit_bias(row: torch.Tensor, bias: dict[int, float]) -> None:
    """In place on one row of logits [V]; ids past the row were refused at admission."""
    ids = torch.tensor(list(bias), dtype=torch.int64, device=row.device)
    row[ids] += torch.tensor(list(bias.values()), dtype=row.dtype, device=row.device)


def _gather_logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, token_ids: list[int], params: list[SamplingParams]
) -> list[dict[int, float] | None]:
    num_top = max(p.logprobs or 0 for p in params)
    chosen = raw.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    top_vals: list[list[float]] = [[] for _ in params]
    top_ids: list[list[int]] = [[] for _ in params]
    if num_top:
        vals, ids = raw.topk(num_top, dim=-1)
        top_vals, top_ids = vals.tolist(), ids.tolist()
    result: list[dict[int, float] | None] = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            result.append(None)
            continue
        entry = {token_ids[i]: chosen[i]}
        for tid, val in zip(top_ids[i][: p.logprobs], top_vals[i][: p.logprobs], strict=True):
            entry.setdefault(tid, val)
        result.append(entry)
    return result
