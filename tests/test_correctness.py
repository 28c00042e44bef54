"""Greedy output matches transformers, teacher-forced, for every architecture (dense, MoE, MLA),
under mixed batches, chunked prefill on and off, prefix-cache hits and preemption."""

from __future__ import annotations

import random

import pytest

from tessera import LLM, SamplingParams
from tests.models import ARCHS, reference_gaps

TOL = 1e-4  # float32: each token's logit within this of the reference's best


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(n)] for n in lengths]


def _check(hf_model, prompts, outputs, max_tokens):
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.prompt_token_ids == prompt
        comp = out.outputs[0]
        assert len(comp.token_ids) == max_tokens and comp.finish_reason == "length"
        gaps = reference_gaps(hf_model, prompt, comp.token_ids)
        assert max(gaps) <= TOL, f"token off the reference argmax by {max(gaps):.2e}"


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("chunked", [True, False])
def test_mixed_batch_matches_reference(device, model_factory, arch, chunked):
    path, hf = model_factory(arch)
    llm = LLM(
        str(path),
        dtype="float32",
        device=device,
        kv_cache_memory=4 << 20,
        max_num_batched_tokens=48 if chunked else 256,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=False,
    )
    # Lengths cross block boundaries (16), the chunk budget (48) and the sliding window (24).
    prompts = _prompts(1, [1, 7, 16, 33, 70, 130])
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    _check(hf, prompts, outputs, GREEDY.max_tokens)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.runtime.num_kv_blocks


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral-sliding", "qwen3-moe", "deepseek-v3"])
def test_prefix_cache_hits_match_reference(device, model_factory, arch):
    path, hf = model_factory(arch)
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=4 << 20,
              max_num_batched_tokens=64)
    shared = _prompts(2, [50])[0]
    first = [shared + t for t in _prompts(3, [5, 20])]
    second = [shared + t for t in _prompts(4, [3, 17, 40])] + [shared[:48]]
    _check(hf, first, llm.generate(first, GREEDY, use_tqdm=False), GREEDY.max_tokens)
    hits_before = llm.engine.scheduler.num_prefix_hit_tokens
    outputs = llm.generate(second, GREEDY, use_tqdm=False)
    _check(hf, second, outputs, GREEDY.max_tokens)
    # Every prompt of the second round reuses at least the 3 full shared blocks (48 tokens),
    # except the last one, whose 48 tokens are all cached but the final one must be computed.
    hit = llm.engine.scheduler.num_prefix_hit_tokens - hits_before
    assert hit >= 3 * 48 + 32
    assert all(o.num_cached_tokens >= 32 for o in outputs)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral", "qwen2-moe", "deepseek-v2-lite"])
def test_preemption_matches_reference(device, model_factory, arch):
    path, hf = model_factory(arch)
    # 12 blocks of 16 tokens: far less than 6 sequences of ~70 tokens need at once.
    from tessera.engine.model_runner import ModelRunner

    llm_probe = LLM(str(path), dtype="float32", device=device, kv_cache_memory=1 << 20)
    per_block = ModelRunner.kv_bytes_per_block(llm_probe.engine.model, 16)
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=12 * per_block,
              max_num_batched_tokens=64)
    prompts = _prompts(5, [40, 45, 50, 35, 60, 42])
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    _check(hf, prompts, outputs, params.max_tokens)
    assert llm.engine.block_manager.num_free_blocks == 12


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_reference(device, model_factory, dtype):
    path, hf = model_factory("llama")
    llm = LLM(str(path), dtype=dtype, device=device, kv_cache_memory=4 << 20)
    prompts = _prompts(6, [9, 30])
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert str(llm.engine.model.embed.weight.dtype) == f"torch.{dtype}"
    assert llm.engine.runner.kv_caches[0] is not None
    assert str(llm.engine.runner.kv_caches[0].dtype) == f"torch.{dtype}"
    for prompt, out in zip(prompts, outputs, strict=True):
        # Half precision keeps ~3 significant digits: allow a small gap to the fp32 reference.
        assert max(reference_gaps(hf, prompt, out.outputs[0].token_ids)) < 0.05


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
def test_narrow_kv_cache_close_to_reference(device, model_factory, kv_dtype):
    path, hf = model_factory("llama")
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=4 << 20,
              kv_cache_dtype=kv_dtype, max_num_batched_tokens=32)
    cache = llm.engine.runner.kv_caches[0]
    assert cache is not None and str(cache.dtype) == f"torch.{kv_dtype}"
    # Half the bytes per block: twice the blocks of a float32 cache of the same size.
    wide = LLM(str(path), dtype="float32", device=device, kv_cache_memory=4 << 20)
    assert llm.engine.runtime.num_kv_blocks == 2 * wide.engine.runtime.num_kv_blocks
    prompts = _prompts(7, [5, 40, 70])
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert max(reference_gaps(hf, prompt, out.outputs[0].token_ids)) < 0.05
