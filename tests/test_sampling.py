"""Sampling parameters through the whole engine."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from tessera import LLM, SamplingParams
from tests.models import EOS_ID, reference_gaps


@pytest.fixture(scope="module")
def llama(device, model_factory):
    path, hf = model_factory("llama")
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=4 << 20)
    return llm, hf


PROMPTS = [[3, 14, 15, 92, 65], [27, 18, 28, 18, 28, 45, 90, 45], [1] * 20]


def test_seed_gives_same_output_whatever_the_batch(llama):
    llm, _ = llama
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], p, use_tqdm=False)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [unseeded, p, unseeded],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    other = SamplingParams(temperature=1.0, seed=99, max_tokens=12, ignore_eos=True)
    assert llm.generate([PROMPTS[0]], other, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_sampling_is_random_without_seed(llama):
    llm, _ = llama
    p = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, n=4)
    outs = llm.generate([PROMPTS[0]], p, use_tqdm=False)[0].outputs
    assert len(outs) == 4 and [o.index for o in outs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in outs}) > 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_k=1, max_tokens=8, ignore_eos=True, seed=1),
        SamplingParams(temperature=0.8, top_p=1e-6, max_tokens=8, ignore_eos=True, seed=1),
        SamplingParams(temperature=0.8, min_p=1.0, max_tokens=8, ignore_eos=True, seed=1),
    ],
    ids=["top_k=1", "tiny top_p", "min_p=1"],
)
def test_truncation_to_one_token_is_greedy(llama, params):
    llm, hf = llama
    out = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0]
    assert max(reference_gaps(hf, PROMPTS[1], out.token_ids)) <= 1e-4


def test_top_k_restricts_to_k_best(llama):
    llm, hf = llama
    import torch

    p = SamplingParams(temperature=5.0, top_k=3, max_tokens=10, ignore_eos=True, seed=3)
    out = llm.generate([PROMPTS[2]], p, use_tqdm=False)[0].outputs[0].token_ids
    ids = torch.tensor([PROMPTS[2] + out])
    with torch.no_grad():
        logits = hf(ids).logits[0]
    for j, tok in enumerate(out):
        top3 = logits[len(PROMPTS[2]) - 1 + j].topk(3).indices.tolist()
        assert tok in top3


@pytest.mark.parametrize(
    "penalties",
    [
        dict(repetition_penalty=1.8),
        dict(frequency_penalty=1.5),
        dict(presence_penalty=2.0),
        dict(frequency_penalty=-0.5, presence_penalty=0.7, repetition_penalty=0.7),
    ],
)
def test_penalties_match_reference(llama, penalties):
    llm, hf = llama
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, **penalties)
    out = llm.generate([PROMPTS[1]], p, use_tqdm=False)[0].outputs[0].token_ids
    assert max(reference_gaps(hf, PROMPTS[1], out, penalties)) <= 1e-4


def test_stop_token_ids_and_max_tokens(llama):
    llm, _ = llama
    free = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=6,
                                                     ignore_eos=True), use_tqdm=False)
    toks = free[0].outputs[0].token_ids
    assert len(toks) == 6 and free[0].outputs[0].finish_reason == "length"
    stop_at = toks[3]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=6,
                       stop_token_ids=[stop_at], ignore_eos=True), use_tqdm=False)[0].outputs[0]
    first = toks.index(stop_at)
    assert out.token_ids == toks[: first + 1] and out.finish_reason == "stop"


def test_eos_stops_unless_ignored(device, model_factory, tmp_path):
    # A model whose EOS (from its generation config) is the token greedy decoding picks
    # first, so it stops at once.
    path, hf = model_factory("llama")
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=4 << 20)
    first = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3,
                                                      ignore_eos=True), use_tqdm=False)
    tok = first[0].outputs[0].token_ids[0]
    shutil.copytree(path, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": tok}))
    llm = LLM(str(tmp_path / "m"), dtype="float32", device=device, kv_cache_memory=4 << 20)
    assert {tok, EOS_ID} <= llm.engine.runtime.eos_token_ids
    stopped = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == [tok] and stopped.finish_reason == "stop"
    kept = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3,
                                                     ignore_eos=True), use_tqdm=False)
    assert len(kept[0].outputs[0].token_ids) == 3


def test_stop_string_is_not_emitted(llama):
    llm, _ = llama
    full = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=12,
                                                  ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    assert len(text) >= 4
    stop = text[2:4]
    cut = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                 stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert stop not in cut.text


def test_logprobs(llama):
    llm, hf = llama
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
    out = llm.generate([PROMPTS[0]], p, use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 5
    import torch

    ids = torch.tensor([PROMPTS[0] + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids).logits[0], -1)
    total = 0.0
    for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert tok in entry and 3 <= len(entry) <= 4
        row = ref[len(PROMPTS[0]) - 1 + j]
        assert math.isclose(entry[tok], float(row[tok]), abs_tol=1e-4)
        assert set(row.topk(3).indices.tolist()) <= set(entry)
        total += entry[tok]
    assert math.isclose(out.cumulative_logprob, total, abs_tol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(min_p=2),
     dict(max_tokens=0), dict(n=0), dict(logprobs=21), dict(presence_penalty=3),
     dict(frequency_penalty=-3), dict(repetition_penalty=0), dict(stop=[""]),
     dict(stop_token_ids=[-1])],
)
def test_invalid_params_raise(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("seed", [None, 5])
def test_random_sampling_draws_from_the_softmax(seed):
    # The exponential race must sample exactly from softmax(logits / T): 4000 draws of a
    # 5-token distribution land within 4 sigma of the expected counts (unseeded rows share the
    # engine generator; seeded rows draw from their own).
    import torch

    from tessera.engine.sampler import Sampler
    from tessera.engine.sequence import Sequence

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    temperature = 0.7
    expected = torch.softmax(logits / temperature, dim=-1)
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = SamplingParams(temperature=temperature, seed=seed)
    counts = torch.zeros(5)
    rows = 400
    seqs = [Sequence(f"r{i}", [1], params, index=i) for i in range(rows)]
    for _ in range(10):
        out = sampler.sample(logits.expand(rows, 5).clone(), seqs)
        counts += torch.bincount(torch.tensor(out.token_ids), minlength=5)
    num = 10 * rows
    sigma = (num * expected * (1 - expected)).sqrt()
    assert ((counts - num * expected).abs() <= 4 * sigma).all(), (counts / num, expected)
