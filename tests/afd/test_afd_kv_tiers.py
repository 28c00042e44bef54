"""KV tiers under Transformerless serving: attention workers load evicted prefixes from their
host tier and the shared SSD directory, with the single-process engine's greedy tokens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tessera import LLM, SamplingParams
from tessera.engine.model_runner import ModelRunner
from tests.afd.conftest import live_processes, worker_pids
from tests.test_kv_tiers import _prompts
from tests.test_serve_util import pid_alive

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


def _store_pids() -> list[int]:
    """Live host KV store processes started from this test process (directly or by a front)."""
    return [pid for pid, cmd, _ in live_processes("tessera.kv.store")
            if f"--parent-pid {os.getpid()}" in cmd]


def _wait_for(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_attention_workers_share_a_host_store_that_outlives_the_pool(model_factory):
    """With kv_offload_memory, the front starts one host KV store for its attention workers:
    a restarted pool finds the blocks the failed one saved, a killed store is started again,
    and closing the engine ends the store."""
    path, _ = model_factory("llama")
    common = dict(dtype="float32", device="cpu", num_threads=1, block_size=16,
                  max_num_batched_tokens=64)
    reference = LLM(str(path), kv_cache_memory=1 << 22, **common)
    prompts = _prompts(5)
    expected = [o.outputs[0].token_ids
                for o in reference.generate(prompts, PARAMS, use_tqdm=False)]
    per_block = ModelRunner.kv_bytes_per_block(reference.engine.model, 16)
    llm = LLM(str(path), kv_cache_memory=12 * per_block, attention_workers=2, ffn_workers=1,
              micro_batches=1, kv_offload_memory=8 << 20, **common)
    try:
        [store_pid] = _store_pids()
        outputs = llm.generate(prompts, PARAMS, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected

        # A worker dies: the pool is restarted, and its fresh workers load from the store
        # what the old ones saved (one prompt alone: no hit can come from this generation).
        os.kill(worker_pids()[0], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:
            [out] = llm.generate([prompts[-1]], PARAMS, use_tqdm=False)
            if out.outputs[0].finish_reason != "error":
                break
            assert time.monotonic() < deadline, "the pool did not come back"
        assert out.outputs[0].token_ids == expected[-1]
        assert llm.engine.num_recoveries == 1
        tiers = {t.tier: t for t in llm.engine.stats().kv_tiers}
        assert tiers["host"].num_hit_tokens_total > 0
        assert _store_pids() == [store_pid]

        # The store is killed: serving goes on (recomputing), and the front starts it again.
        os.kill(store_pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while _store_pids() in ([], [store_pid]):
            assert time.monotonic() < deadline, "the store was not started again"
            outputs = llm.generate(prompts[:2], PARAMS, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outputs] == expected[:2]
        assert llm.engine.stats().kv_cache_usage == 0
    finally:
        llm.close()
    assert not worker_pids()
    _wait_for(lambda: not _store_pids(), "the store outlived its engine")


def test_a_store_ends_with_its_owner_killed(tmp_path):
    """A front killed by SIGKILL leaves no store behind: the store watches its parent."""
    code = ("import sys, time; from tessera.kv.store_process import StoreProcess; "
            f"s = StoreProcess('ipc://{tmp_path}/s.sock', 1 << 20); "
            "print(s.pid, flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        store_pid = int(owner.stdout.readline())
        owner.kill()
        owner.wait(30)
        _wait_for(lambda: not pid_alive(store_pid), "the store outlived its owner", 60)
    finally:
        owner.kill()
