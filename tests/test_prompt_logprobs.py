"""``SamplingParams.prompt_logprobs`` through the whole engine, against the reference model."""

from __future__ import annotations

import pytest
import torch

from tessera import LLM, SamplingParams

TOL = 1e-3
"""float32 engine against the float32 reference, teacher-forced."""


def _reference(hf, prompt: list[int]) -> torch.Tensor:
    """log_softmax [P, V] of the reference model at every prompt position."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)


def _check(hf, prompt: list[int], out, num_top: int) -> None:
    """``out``'s prompt logprobs are the reference's: each token's, its rank, the top-N."""
    ref = _reference(hf, prompt)
    plp, ranks = out.prompt_logprobs, out.prompt_token_ranks
    assert plp is not None and ranks is not None
    assert len(plp) == len(ranks) == len(prompt)
    assert plp[0] is None and ranks[0] is None
    for j in range(1, len(prompt)):
        row, entry, tok = ref[j - 1], plp[j], prompt[j]
        assert entry is not None
        assert abs(entry[tok] - row[tok].item()) < TOL
        # Rank: 1 + tokens more likely (a token within the tolerance may go either way).
        lp = row[tok].item()
        assert int((row > lp + TOL).sum()) + 1 <= ranks[j] <= int((row > lp - TOL).sum()) + 1
        for tid in entry:
            assert abs(entry[tid] - row[tid].item()) < TOL
        # The top-N alternatives: N of them besides the token, or N - 1 when it is one.
        others = set(entry) - {tok}
        assert len(others) in (num_top, num_top - 1)
        if num_top:
            nth_best = row.topk(num_top).values[-1].item()
            assert all(row[t].item() >= nth_best - TOL for t in others)
            assert len(others) == num_top or lp >= nth_best - TOL


def _llm(path, device, **options) -> LLM:
    return LLM(str(path), dtype="float32", device=device, kv_cache_memory=4 << 20, **options)


PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19, 71]


@pytest.fixture(scope="module")
def llama(device, model_factory):
    path, hf = model_factory("llama")
    return _llm(path, device), hf


@pytest.mark.parametrize("num_top", [0, 1, 5])
def test_prompt_logprobs_match_reference(llama, num_top):
    llm, hf = llama
    p = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=num_top)
    out = llm.generate([PROMPT], p, use_tqdm=False)[0]
    _check(hf, PROMPT, out, num_top)
    if num_top == 0:
        assert all(e is None or len(e) == 1 for e in out.prompt_logprobs)


def test_without_prompt_logprobs_there_are_none(llama):
    llm, _ = llama
    out = llm.generate([PROMPT], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert out.prompt_logprobs is None and out.prompt_token_ranks is None


def test_chunked_prefill_accumulates_across_chunks(device, model_factory):
    path, hf = model_factory("llama")
    llm = _llm(path, device, max_num_batched_tokens=7, max_num_seqs=4)
    chunks: list[tuple[int, int, int]] = []
    llm.engine.add_step_observer(lambda out: chunks.extend(
        (s.num_computed_tokens, n, s.num_prompt_tokens)
        for s, n in zip(out.seqs, out.num_new_tokens, strict=True)))
    # 7-token steps: the first prompt fills one; the next step holds its decode, the second
    # prompt and one token of the third, which then goes on in chunks of at most 5.
    prompts = [PROMPT[:7], PROMPT[7:12], PROMPT[3:] + [7, 9, 11]]
    p = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=3)
    outs = llm.generate(prompts, p, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        _check(hf, prompt, out, 3)
    # A one-token chunk inside a prompt (the runner lays it out as a decode row).
    assert any(n == 1 and start + 1 < num for start, n, num in chunks)
    assert any(1 < n < num - start for start, n, num in chunks)


def test_prefix_cache_hit_still_gets_full_prompt_logprobs(device, model_factory):
    path, hf = model_factory("llama")
    llm = _llm(path, device, block_size=4)
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    llm.generate([PROMPT], plain, use_tqdm=False)  # fills the prefix cache
    cached = llm.generate([PROMPT], plain, use_tqdm=False)[0]
    assert cached.num_cached_tokens > 0
    p = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2)
    out = llm.generate([PROMPT], p, use_tqdm=False)[0]
    _check(hf, PROMPT, out, 2)
    assert out.num_cached_tokens == 0
    assert out.outputs[0].token_ids == cached.outputs[0].token_ids


def test_n_above_one(llama):
    llm, hf = llama
    p = SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=3, prompt_logprobs=4)
    out = llm.generate([PROMPT], p, use_tqdm=False)[0]
    assert len(out.outputs) == 3
    _check(hf, PROMPT, out, 4)


def test_mixed_batch(llama):
    """Requests with and without prompt logprobs, and sampled logprobs, in one batch."""
    llm, hf = llama
    prompts = [PROMPT, PROMPT[:9], [5, 6, 7, 8]]
    params = [SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=3),
              SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=0)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    _check(hf, prompts[0], outs[0], 2)
    assert outs[1].prompt_logprobs is None
    _check(hf, prompts[2], outs[2], 0)
    assert outs[0].outputs[0].logprobs is not None and len(outs[0].outputs[0].logprobs) == 3


def test_preemption_keeps_prompt_logprobs_whole(device, model_factory):
    path, hf = model_factory("llama")
    probe = LLM(str(path), dtype="float32", device=device, kv_cache_memory=1 << 20)
    per_block = probe.engine.runner.kv_bytes_per_block(probe.engine.model, 16)
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=6 * per_block,
              max_num_batched_tokens=16)
    prompts = [PROMPT + [i] * 10 for i in range(4)]
    p = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(prompts, p, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs, strict=True):
        _check(hf, prompt, out, 1)


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_bad_prompt_logprobs_are_refused(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)


def test_transformerless_pool_refuses_prompt_logprobs():
    """Refused before anything reaches a worker (so no pool is started here)."""
    from tessera.afd.front import AFDEngine

    front = AFDEngine.__new__(AFDEngine)  # only the request table is read before the check
    front.requests = {}
    with pytest.raises(ValueError, match="prompt_logprobs is not supported"):
        front.add_request("r", [1, 2, 3], SamplingParams(prompt_logprobs=1))
