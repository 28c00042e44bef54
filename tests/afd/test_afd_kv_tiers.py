"""KV tiers under Transformerless serving: attention workers load evicted prefixes from their
host tier and the shared SSD directory, with the single-process engine's greedy tokens."""

from __future__ import annotations

import pytest

from tessera import LLM, SamplingParams
from tessera.engine.model_runner import ModelRunner
from tests.afd.conftest import worker_pids
from tests.test_kv_tiers import _prompts

pytestmark = pytest.mark.processes

PARAMS = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


def test_attention_workers_serve_prefixes_from_their_tiers(model_factory, tmp_path):
    path, _ = model_factory("llama")
    common = dict(dtype="float32", device="cpu", num_threads=1, block_size=16,
                  max_num_batched_tokens=64)
    reference = LLM(str(path), kv_cache_memory=1 << 22, **common)
    prompts = _prompts(3)
    expected = [o.outputs[0].token_ids
                for o in reference.generate(prompts, PARAMS, use_tqdm=False)]
    # 12 device blocks: far fewer than the conversations' distinct blocks, so prefixes come
    # back from the tiers.
    per_block = ModelRunner.kv_bytes_per_block(reference.engine.model, 16)
    llm = LLM(str(path), kv_cache_memory=12 * per_block, attention_workers=1, ffn_workers=1,
              micro_batches=2, kv_offload_memory=8 << 20, kv_offload_dir=str(tmp_path / "kv"),
              **common)
    try:
        for _ in range(2):
            outputs = llm.generate(prompts, PARAMS, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outputs] == expected
        tiers = {t.tier: t for t in llm.engine.stats().kv_tiers}
        assert tiers["host"].num_hit_tokens_total > 0
        assert tiers["disk"].num_written_bytes_total > 0
        assert llm.engine.stats().kv_cache_usage == 0
    finally:
        llm.close()
    assert not worker_pids()
    assert list((tmp_path / "kv").glob("*/??/*.kvb"))


def test_attention_workers_share_a_remote_tier(model_factory):
    """The remote tier under Transformerless serving: an attention worker loads what a
    single-process engine stored in the store (another host, as far as it can tell)."""
    from tests.test_kv_remote import Store

    path, _ = model_factory("llama")
    store = Store()
    store.start()
    common = dict(dtype="float32", device="cpu", num_threads=1, block_size=16,
                  max_num_batched_tokens=64)
    try:
        writer = LLM(str(path), kv_cache_memory=1 << 22, kv_store=store.url, **common)
        prompts = _prompts(4)
        expected = [o.outputs[0].token_ids
                    for o in writer.generate(prompts, PARAMS, use_tqdm=False)]
        writer.engine.shutdown()  # sends its queued writes
        per_block = ModelRunner.kv_bytes_per_block(writer.engine.model, 16)
        llm = LLM(str(path), kv_cache_memory=12 * per_block, attention_workers=1,
                  ffn_workers=1, micro_batches=2, kv_store=store.url, **common)
        try:
            outputs = llm.generate(prompts, PARAMS, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outputs] == expected
            tiers = {t.tier: t for t in llm.engine.stats().kv_tiers}
            assert tiers["remote"].num_hit_tokens_total > 0
            assert tiers["remote"].num_failed_loads_total == 0
            assert llm.engine.stats().kv_cache_usage == 0
        finally:
            llm.close()
        assert not worker_pids()
    finally:
        store.kill()
