"""Speculative decoding with prompt-lookup (n-gram) drafts: the drafter, the scheduler's
accounting of draft tokens, the verifier's distribution, and end-to-end outputs that match
decoding without speculation."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera import LLM, SamplingParams
from tessera.config import SchedulerConfig
from tessera.demo_model import model_dir
from tessera.demo_model.tasks import copy, held_out_additions, reverse, word
from tessera.demo_model.train import render
from tessera.engine.block_manager import BlockManager
from tessera.engine.ngram_drafter import NgramDrafter
from tessera.engine.sampler import Sampler
from tessera.engine.scheduler import Scheduler
from tessera.engine.sequence import Sequence
from tests.models import reference_gaps

NGRAM = dict(speculative_method="ngram")


def decoding(tokens: list[int], params: SamplingParams | None = None) -> Sequence:
    """A sequence whose tokens but the last are computed (as the scheduler drafts for)."""
    seq = Sequence("r", tokens, params or SamplingParams(temperature=0.0, max_tokens=100))
    seq.num_computed_tokens = len(tokens) - 1
    return seq


def drafter(**options) -> NgramDrafter:
    return NgramDrafter(SchedulerConfig(**{**NGRAM, **options}), max_model_len=1000)


# ------------------------------------------------------------------------------- the drafter


def test_draft_follows_the_latest_longest_match():
    d = drafter(num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3)
    # "5 6" occurs twice; the later occurrence is followed by 9 9 9, the 3-gram "4 5 6" once.
    assert d.propose(decoding([4, 5, 6, 1, 2, 5, 6, 9, 9, 9, 0, 5, 6]), 8) == [9, 9, 9]
    assert d.propose(decoding([4, 5, 6, 1, 5, 6, 7, 7, 4, 5, 6]), 8) == [1, 5, 6]
    assert d.propose(decoding([1, 2, 3]), 8) == []  # nothing repeats
    assert d.propose(decoding([1, 2, 1, 2, 3, 4, 1]), 0) == []  # no budget


def test_draft_is_bounded_by_budget_max_tokens_and_context():
    d = drafter(num_speculative_tokens=8)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1]
    assert d.propose(decoding(list(tokens)), 3) == [2, 3, 4]
    # One token left to generate: a draft would only be thrown away.
    seq = decoding(list(tokens), SamplingParams(temperature=0.0, max_tokens=2))
    seq.num_prompt_tokens = len(tokens) - 1
    assert d.propose(seq, 8) == []
    short = NgramDrafter(SchedulerConfig(**NGRAM, num_speculative_tokens=8), max_model_len=12)
    assert short.propose(decoding(list(tokens)), 8) == [2, 3]  # positions stay below 12


def test_requests_whose_sampling_reads_earlier_tokens_draft_nothing():
    d = drafter()
    tokens = [1, 2, 3, 1, 2]
    for params in (SamplingParams(repetition_penalty=1.2), SamplingParams(logprobs=2),
                   SamplingParams(presence_penalty=0.5)):
        assert d.propose(decoding(list(tokens), params), 8) == []
    assert d.propose(decoding(list(tokens), SamplingParams(temperature=0.7)), 8) == [3, 1, 2]


def test_draft_length_follows_acceptance():
    d = drafter(num_speculative_tokens=4)
    seq = decoding([1, 2, 3, 4, 5, 6, 1, 2])
    assert len(d.propose(seq, 8)) == 4
    d.observe(seq, 4, 1)
    assert len(d.propose(seq, 8)) == 2  # one more than was accepted
    d.observe(seq, 2, 2)
    assert len(d.propose(seq, 8)) == 3  # a full acceptance grows it by one
    s = d.stats
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (2, 6, 3)
    assert s.drafted_per_position == [2, 2, 1, 1] and s.accepted_per_position == [2, 1, 0, 0]


def test_outright_rejections_pause_drafting_longer_each_time():
    d = drafter(num_speculative_tokens=2)
    seq = decoding([1, 2, 3, 1, 2, 3, 1])
    assert d.propose(seq, 8)
    pauses = []
    for _ in range(5):
        d.observe(seq, 1, 0)  # rejected outright
        num_skipped = 0
        while not d.propose(seq, 8):
            num_skipped += 1
        pauses.append(num_skipped)
    assert pauses == [1, 3, 7, 15, 15]
    d.observe(seq, 1, 1)  # an acceptance ends the backoff
    assert d.propose(seq, 8)
    d.observe(seq, 1, 0)
    assert d.propose(seq, 8) == [] and d.propose(seq, 8)  # a one-step pause again


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=2, max_size=40), st.integers(1, 3),
       st.integers(0, 3), st.integers(1, 6))
def test_incremental_index_matches_a_brute_force_search(tokens, min_n, extra, k):
    """Grown token by token, the index proposes what a search from scratch finds."""
    max_n = min_n + extra
    d = drafter(num_speculative_tokens=k, prompt_lookup_min=min_n, prompt_lookup_max=max_n)
    seq = decoding(tokens[:2])
    for t in tokens[2:] + [None]:
        got = d.propose(seq, k)
        want: list[int] = []
        toks, n_all = seq.token_ids, len(seq.token_ids)
        for n in range(min(max_n, n_all - 1), min_n - 1, -1):
            suffix = toks[n_all - n:]
            starts = [i for i in range(n_all - n) if toks[i : i + n] == suffix]
            if starts:
                want = toks[starts[-1] + n : starts[-1] + n + k]
                break
        assert got == want
        if t is not None:
            seq.token_ids.append(t)
            seq.num_computed_tokens += 1


# ---------------------------------------------------------------------------- the scheduler


def make(num_blocks=16, block_size=4, budget=32, k=4):
    bm = BlockManager(num_blocks, block_size)
    config = SchedulerConfig(8, budget, **NGRAM, num_speculative_tokens=k)
    return Scheduler(config, bm, drafter=NgramDrafter(config, 1000)), bm


def test_drafts_run_in_the_step_and_rejected_blocks_go_back():
    sched, bm = make(block_size=4, k=4)
    seq = Sequence("a", [1, 2, 3, 4, 5, 6, 1, 2], SamplingParams(temperature=0.0, max_tokens=50))
    sched.add(seq)
    out = sched.schedule()  # the prompt
    sched.update(out, [3])
    assert seq.token_ids[-1] == 3 and seq.num_computed_tokens == 8
    out = sched.schedule()
    assert out.num_draft_tokens == [4] and out.num_new_tokens == [5]
    assert seq.draft_token_ids == [4, 5, 6, 1]
    assert len(seq.block_ids) == 4  # positions 8..12 reach a fourth block
    # One draft token accepted, then the verifier's own token.
    sched.update(out, [9], num_accepted=[1])
    assert seq.token_ids[-3:] == [3, 4, 9] and seq.num_computed_tokens == 10
    assert seq.draft_token_ids == []
    assert len(seq.block_ids) == bm.num_blocks_for(seq.num_tokens) == 3
    assert bm.num_free_blocks == bm.num_blocks - 3
    sched.finish(seq, "stop")
    assert bm.num_free_blocks == bm.num_blocks


def test_drafts_never_preempt_and_fit_the_budget():
    sched, bm = make(num_blocks=3, block_size=4, budget=3, k=4)
    seq = Sequence("a", [1, 2, 3, 1, 2, 3, 1], SamplingParams(temperature=0.0, max_tokens=50))
    sched.add(seq)
    sched.update(sched.schedule(), [None])  # budget 3: the prompt in chunks
    sched.update(sched.schedule(), [None])
    # The prompt's last token is drafted for too; budget 3 leaves room for 2 draft tokens,
    # and they fit the blocks.
    out = sched.schedule()
    assert out.num_draft_tokens == [2] and out.num_new_tokens == [3] and not out.preempted
    sched.update(out, [5], num_accepted=[2])
    assert seq.token_ids[7:] == [2, 3, 5] and seq.num_computed_tokens == 9
    other = Sequence("b", [7, 7, 7, 7], SamplingParams(temperature=0.0, max_tokens=50))
    sched.add(other)
    out = sched.schedule()
    assert not out.preempted


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(2, 12))
def test_random_acceptance_leaks_no_blocks(seed, num_blocks):
    """Any mix of drafts, acceptances, preemptions and ends leaves every block accounted for
    and, once all requests end, free."""
    rng = random.Random(seed)
    sched, bm = make(num_blocks=num_blocks, block_size=2, budget=12, k=3)
    for r in range(3):
        sched.add(Sequence(str(r), [rng.randrange(3) for _ in range(rng.randint(1, 6))],
                           SamplingParams(temperature=0.0, max_tokens=12)))
    for _ in range(200):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        tokens = [rng.randrange(3) if s.num_computed_tokens + n - d == s.num_tokens else None
                  for s, n, d in zip(out.seqs, out.num_new_tokens, out.num_draft_tokens,
                                     strict=True)]
        sched.update(out, tokens, [rng.randint(0, d) for d in out.num_draft_tokens])
        in_use: dict[int, int] = {}
        for s in sched.running:
            assert len(s.block_ids) * bm.block_size >= s.num_computed_tokens
            for b in s.block_ids:
                in_use[b] = in_use.get(b, 0) + 1
        for b in range(bm.num_blocks):
            assert bm.ref_counts[b] == in_use.get(b, 0)
        for s in list(sched.running):
            if s.num_output_tokens >= 12:
                sched.finish(s, "length")
    for s in [*sched.running, *sched.waiting]:
        sched.finish(s, "abort")
    assert bm.num_free_blocks == bm.num_blocks


# ----------------------------------------------------------------------------- the verifier


def test_verifier_keeps_the_target_distribution():
    """A row that verifies a draft token emits (draft if accepted, else its own sample) a
    token distributed as the model's, for temperature and top-k alike (a chi-square bound
    over 40,000 draws)."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    for params, draft in ((SamplingParams(temperature=1.0), 0),
                          (SamplingParams(temperature=0.7, top_k=4), 3),
                          (SamplingParams(temperature=1.3), 4)):
        seq = decoding([1, 2], params)
        num = 40_000
        rows = logits.expand(num, -1).contiguous()
        sampler = Sampler(torch.device("cpu"), seed=1)
        out = sampler.sample(rows, [seq] * num, [draft] * num)
        assert out.accepted is not None
        emitted = [draft if ok else t for ok, t in zip(out.accepted, out.token_ids, strict=True)]
        counts = torch.bincount(torch.tensor(emitted), minlength=6).double()
        x = logits / params.temperature
        if params.top_k > 0:
            x = x.masked_fill(x < x.topk(params.top_k).values[-1], float("-inf"))
        want = x.softmax(-1).double() * num
        mask = want > 0
        assert counts[~mask].sum() == 0  # nothing outside top-k
        chi2 = float(((counts[mask] - want[mask]) ** 2 / want[mask]).sum())
        assert chi2 < 25.0, (params, counts.tolist(), want.tolist())  # dof <= 5: p < 1e-4


def test_greedy_rows_accept_exactly_their_argmax():
    sampler = Sampler(torch.device("cpu"), seed=0)
    seq = decoding([1, 2])
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    out = sampler.sample(logits, [seq] * 3, [1, 2, None])
    assert out.accepted == [True, False, False] and out.token_ids == [1, 0, 2]


# ------------------------------------------------------------------------------ end to end


def demo_prompts() -> list[str]:
    rng = random.Random(3)
    examples = ([copy(word(rng)) for _ in range(4)] + [reverse(word(rng)) for _ in range(2)]
                + held_out_additions(4))
    return [render(e)[0] for e in examples]


@pytest.mark.parametrize("batched", [False, True])
def test_demo_model_greedy_output_is_unchanged(batched):
    plain = LLM(str(model_dir()), dtype="float32", max_num_batched_tokens=24)
    spec = LLM(str(model_dir()), dtype="float32", max_num_batched_tokens=24, **NGRAM)
    prompts = demo_prompts()
    greedy = SamplingParams(temperature=0.0, max_tokens=60)
    if batched:  # continuous batching and chunked prefill (24-token steps) alongside drafts
        want = plain.generate(prompts, greedy, use_tqdm=False)
        got = spec.generate(prompts, greedy, use_tqdm=False)
    else:
        want = [plain.generate([p], greedy, use_tqdm=False)[0] for p in prompts]
        got = [spec.generate([p], greedy, use_tqdm=False)[0] for p in prompts]
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].text == w.outputs[0].text
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
    stats = spec.engine.stats()
    assert stats.spec_decode is not None
    assert stats.spec_decode.num_accepted_tokens_total > 10  # the copies are drafted
    assert stats.num_generation_tokens_total == sum(len(w.outputs[0].token_ids) for w in want)
    engine = spec.engine
    assert engine.block_manager.num_free_blocks == engine.runtime.num_kv_blocks


def test_stops_inside_an_accepted_draft():
    """max_tokens, a stop token and a stop string that fall inside the accepted tokens of a
    step end the output exactly where decoding without drafts ends it."""
    plain = LLM(str(model_dir()), dtype="float32")
    spec = LLM(str(model_dir()), dtype="float32", **NGRAM, num_speculative_tokens=8)
    prompt = render(copy("abcdefgh"))[0]
    stop_id = plain.get_tokenizer().convert_tokens_to_ids("e")
    for params in (SamplingParams(temperature=0.0, max_tokens=4),
                   SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop_id]),
                   SamplingParams(temperature=0.0, max_tokens=30, stop=["ef"])):
        want = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        got = spec.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason) == (
            want.token_ids, want.text, want.finish_reason)
    assert spec.engine.stats().spec_decode.num_accepted_tokens_total > 0


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe", "deepseek-v3"])
def test_random_models_match_the_reference_with_drafts(model_factory, arch):
    """Dense, MoE and MLA: teacher-forced against transformers, with prompts that repeat so
    that drafts are proposed (a random model rejects most of them: both paths run)."""
    path, hf = model_factory(arch)
    llm = LLM(str(path), dtype="float32", kv_cache_memory=4 << 20, max_num_batched_tokens=64,
              **NGRAM)
    rng = random.Random(5)
    prompts = [[rng.randrange(0, 40) for _ in range(6)] * 4 for _ in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs, strict=True):
        gaps = reference_gaps(hf, prompt, out.outputs[0].token_ids)
        assert len(gaps) == 24 and max(gaps) <= 1e-4
    stats = llm.engine.stats().spec_decode
    assert stats is not None and stats.num_draft_tokens_total > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.runtime.num_kv_blocks


def test_seeded_sampling_is_reproducible_with_drafts():
    spec = LLM(str(model_dir()), dtype="float32", **NGRAM)
    prompts = demo_prompts()[:4]
    params = SamplingParams(temperature=0.8, max_tokens=40, seed=11)
    first = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    again = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    assert first == again


@pytest.mark.parametrize("options,message", [
    (dict(speculative_method="eagle"), "speculative_method must be one of ngram"),
    (dict(num_speculative_tokens=0), "num_speculative_tokens must be a positive integer"),
    (dict(num_speculative_tokens=99), "at most 16"),
    (dict(prompt_lookup_min=3, prompt_lookup_max=2), "must not exceed"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**options)



@pytest.mark.processes
def test_server_streams_drafted_tokens_and_counts_them():
    """Through `tessera serve --speculative-method ngram`: a streamed chat gives the same text
    as a non-streamed one and as a server without drafts, the stream carries every token (a
    step may add several), and /metrics counts drafts per position."""
    import json

    import httpx

    from tessera.demo_model import SERVED_NAME
    from tests.test_serve_util import ServerProcess

    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Copy: qwertyui"}],
            "max_tokens": 30, "temperature": 0}
    texts = {}
    for extra in ((), ("--speculative-method", "ngram", "--num-speculative-tokens", "6")):
        srv = ServerProcess(model_dir(), *extra, name=SERVED_NAME)
        try:
            srv.wait_ready()
            url = f"{srv.base_url}/v1/chat/completions"
            whole = httpx.post(url, json=body, timeout=60).json()
            chunks = []
            with httpx.stream("POST", url, json=body | {"stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        chunks.append(delta.get("content") or "")
            text = whole["choices"][0]["message"]["content"]
            assert "".join(chunks) == text
            texts[bool(extra)] = text
            if extra:
                assert srv.metric("tessera:spec_decode_num_accepted_tokens_total") > 0
                assert srv.metric("tessera:spec_decode_num_draft_tokens_total") >= \
                    srv.metric("tessera:spec_decode_num_accepted_tokens_total")
                metrics = httpx.get(f"{srv.base_url}/metrics", timeout=5).text
                assert 'tessera:spec_decode_num_accepted_tokens_per_pos_total{' in metrics
                assert 'position="0"' in metrics
        finally:
            srv.stop()
    assert texts[True] == texts[False] == "qwertyui"
