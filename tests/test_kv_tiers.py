"""KV tiers below the device pool (host memory, SSD): greedy output stays on the reference,
teacher-forced, when KV comes back from a tier, after a restart, and when tier files are
corrupt, truncated, missing or foreign; a tier that cannot write leaves serving running; and
no block is leaked in any tier."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from tessera import LLM, SamplingParams
from tessera.engine.model_runner import ModelRunner
from tessera.kv.disk_tier import SUFFIX
from tests.models import reference_gaps

TOL = 1e-4
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
ARCHS = ["llama", "qwen3-moe", "deepseek-v3-moe"]  # dense, MoE, MLA latents + MoE


def _prompts(seed: int) -> list[list[int]]:
    """Conversations: each shares a system prefix, then grows turn by turn."""
    rng = random.Random(seed)
    system = [rng.randrange(256) for _ in range(40)]
    prompts = []
    for _ in range(3):
        history = list(system)
        for _ in range(3):
            history += [rng.randrange(256) for _ in range(rng.randrange(10, 30))]
            prompts.append(list(history))
    return prompts


def _llm(path: Path, num_device_blocks: int, **options) -> LLM:
    probe = LLM(str(path), dtype="float32", kv_cache_memory=1 << 20)
    per_block = ModelRunner.kv_bytes_per_block(probe.engine.model, 16)
    return LLM(str(path), dtype="float32", kv_cache_memory=num_device_blocks * per_block,
               max_num_batched_tokens=64, **options)


def _check(hf, prompts, outputs) -> None:
    for prompt, out in zip(prompts, outputs, strict=True):
        gaps = reference_gaps(hf, prompt, out.outputs[0].token_ids)
        assert max(gaps) <= TOL, f"token off the reference argmax by {max(gaps):.2e}"


def _tiers(llm: LLM) -> dict:
    return {t.tier: t for t in llm.engine.stats().kv_tiers}


def _assert_idle(llm: LLM, files_untouched: bool = True) -> None:
    """Every device block free; nothing in flight; the disk tier's accounting adds up and,
    unless the test altered files behind its back, equals the files on disk."""
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.runtime.num_kv_blocks
    connector = engine.kv_connector
    assert connector is not None
    if connector.disk is not None:
        disk = connector.disk
        assert disk.flush(timeout_s=60)
        assert disk.used_bytes == sum(disk.files.values())
        if files_untouched:
            files = list(disk.dir.glob(f"??/*{SUFFIX}"))
            assert disk.used_bytes == sum(f.stat().st_size for f in files)
            assert len(disk.files) == len(files)
    if connector.host is not None:
        host = connector.host
        assert len(host.slots) + len(host.free_slots) == host.num_slots


@pytest.mark.parametrize("arch", ARCHS)
def test_tiers_serve_evicted_prefixes_on_the_reference(model_factory, tmp_path, arch):
    path, hf = model_factory(arch)
    # 12 device blocks: far fewer than the conversations' 30+ distinct blocks, so prefixes
    # fall out of the device pool and come back from the tiers.
    llm = _llm(path, 12, kv_offload_memory=64 << 20, kv_offload_dir=str(tmp_path / "kv"))
    prompts = _prompts(1)
    first = llm.generate(prompts, PARAMS, use_tqdm=False)
    _check(hf, prompts, first)
    second = llm.generate(prompts, PARAMS, use_tqdm=False)
    _check(hf, prompts, second)
    tiers = _tiers(llm)
    assert tiers["host"].num_hit_tokens_total > 0
    assert tiers["host"].num_written_bytes_total > 0
    _assert_idle(llm)
    assert tiers["disk"].num_failed_loads_total == 0
    llm.engine.shutdown()
    assert _tiers(llm)["disk"].num_blocks > 0

    # A restarted engine (no host tier) finds the SSD tier warm.
    again = _llm(path, 12, kv_offload_dir=str(tmp_path / "kv"))
    third = again.generate(prompts, PARAMS, use_tqdm=False)
    _check(hf, prompts, third)
    assert _tiers(again)["disk"].num_hit_tokens_total > 0
    assert [o.outputs[0].token_ids for o in third] == [o.outputs[0].token_ids for o in second]
    _assert_idle(again)
    again.engine.shutdown()


def _swap_with_neighbour(files: list[Path]) -> None:
    datas = [f.read_bytes() for f in files]
    for f, data in zip(files, datas[1:] + datas[:1], strict=True):
        f.write_bytes(data)


DAMAGE = {
    "corrupt": lambda files: [f.write_bytes(f.read_bytes()[:-10] + bytes(
        b ^ 0xFF for b in f.read_bytes()[-10:])) for f in files],
    "truncated": lambda files: [f.write_bytes(f.read_bytes()[:100]) for f in files],
    "junk": lambda files: [f.write_bytes(b"not a block") for f in files],
    "another-block": _swap_with_neighbour,
    "missing": lambda files: [f.unlink() for f in files],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_bad_block_files_are_recomputed(model_factory, tmp_path, caplog, damage):
    """Every block file is damaged after the engine indexed it: each load of one fails and is
    recomputed, and the output stays on the reference."""
    path, hf = model_factory("llama")
    kv = tmp_path / "kv"
    llm = _llm(path, 12, kv_offload_dir=str(kv))
    prompts = _prompts(2)
    llm.generate(prompts, PARAMS, use_tqdm=False)
    llm.engine.shutdown()
    again = _llm(path, 12, kv_offload_dir=str(kv))
    files = sorted(kv.glob(f"*/??/*{SUFFIX}"))
    assert len(files) >= 8 and len(again.engine.kv_connector.disk.files) == len(files)
    DAMAGE[damage](files)
    with caplog.at_level(logging.WARNING, logger="tessera.kv.disk_tier"):
        outputs = again.generate(prompts, PARAMS, use_tqdm=False)
    _check(hf, prompts, outputs)
    disk = _tiers(again)["disk"]
    assert disk.num_failed_loads_total >= 1
    if damage != "missing":
        assert "refused and recomputed" in caplog.text
    _assert_idle(again, files_untouched=False)
    again.engine.shutdown()


def test_foreign_model_blocks_are_never_read(model_factory, tmp_path):
    """Two checkpoints of one architecture (same config, other weights) share a directory:
    neither reads the other's blocks."""
    path_a, hf_a = model_factory("llama")
    path_b, hf_b = model_factory("llama", seed=7)
    kv = str(tmp_path / "kv")
    prompts = _prompts(3)
    a = _llm(path_a, 12, kv_offload_dir=kv)
    a.generate(prompts, PARAMS, use_tqdm=False)
    a.engine.shutdown()
    b = _llm(path_b, 12, kv_offload_dir=kv)
    outputs = b.generate(prompts, PARAMS, use_tqdm=False)
    _check(hf_b, prompts, outputs)
    assert _tiers(b)["disk"].num_hit_tokens_total == 0
    assert len(list((tmp_path / "kv").iterdir())) == 2  # one directory per layout
    b.engine.shutdown()


def test_unwritable_disk_tier_warns_once_and_serving_continues(model_factory, tmp_path,
                                                               caplog):
    path, hf = model_factory("llama")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="tessera.kv.disk_tier"):
        llm = _llm(path, 12, kv_offload_memory=16 << 20, kv_offload_dir=str(blocker / "kv"))
        prompts = _prompts(4)
        llm.generate(prompts, PARAMS, use_tqdm=False)
        outputs = llm.generate(prompts, PARAMS, use_tqdm=False)
    _check(hf, prompts, outputs)
    assert caplog.text.count("stops taking writes") == 1
    disk = _tiers(llm)["disk"]
    assert not disk.writable and disk.num_blocks == 0
    assert _tiers(llm)["host"].num_hit_tokens_total > 0  # the host tier still serves
    llm.engine.shutdown()


def test_disk_full_mid_run_stops_writes(model_factory, tmp_path, monkeypatch, caplog):
    import errno
    import os

    path, hf = model_factory("llama")
    llm = _llm(path, 12, kv_offload_dir=str(tmp_path / "kv"))
    real_replace = os.replace
    calls = {"n": 0}

    def replace_then_fill(src, dst):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr("tessera.kv.disk_tier.os.replace", replace_then_fill)
    prompts = _prompts(5)
    with caplog.at_level(logging.WARNING, logger="tessera.kv.disk_tier"):
        outputs = llm.generate(prompts, PARAMS, use_tqdm=False)
        llm.engine.kv_connector.disk.flush(timeout_s=60)
    _check(hf, prompts, outputs)
    assert caplog.text.count("stops taking writes") == 1
    assert _tiers(llm)["disk"].num_blocks == 5
    assert not list((tmp_path / "kv").glob("*/??/*.tmp"))  # no half-written file left
    _assert_idle(llm)
    llm.engine.shutdown()


def test_disk_budget_evicts_least_recently_used(model_factory, tmp_path):
    path, _ = model_factory("llama")
    probe = _llm(path, 12, kv_offload_dir=str(tmp_path / "probe"))
    block_bytes = probe.engine.kv_connector.block_bytes
    probe.engine.shutdown()
    budget = 6 * (block_bytes + 400)  # room for 6 files (payload plus header)
    llm = _llm(path, 12, kv_offload_dir=str(tmp_path / "kv"), kv_offload_disk=budget)
    llm.generate(_prompts(6), PARAMS, use_tqdm=False)
    disk = llm.engine.kv_connector.disk
    assert disk.flush(timeout_s=60)
    stats = _tiers(llm)["disk"]
    assert 0 < stats.num_used_bytes <= budget and stats.num_evicted_blocks_total > 0
    _assert_idle(llm)
    llm.engine.shutdown()


def test_abort_with_tier_traffic_leaks_nothing(model_factory, tmp_path):
    path, _ = model_factory("deepseek-v3-moe")
    llm = _llm(path, 12, kv_offload_memory=8 << 20, kv_offload_dir=str(tmp_path / "kv"))
    prompts = _prompts(7)
    llm.generate(prompts, PARAMS, use_tqdm=False)  # fill the tiers
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, PARAMS)
    num_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        num_steps += 1
        if num_steps % 2:
            for i in range(len(prompts)):
                engine.abort_request(f"r{i}") if (i + num_steps) % 3 == 0 else None
    _assert_idle(llm)
    llm.engine.shutdown()


def test_bad_tier_options_are_refused(model_factory):
    path, _ = model_factory("llama")
    for options, message in (
        (dict(kv_offload_memory=0), "kv_offload_memory must be positive"),
        (dict(kv_offload_memory=-5), "kv_offload_memory must be positive"),
        (dict(kv_offload_dir="  "), "kv_offload_dir must be a directory"),
        (dict(kv_offload_dir="/tmp/x", kv_offload_disk=0), "kv_offload_disk must be positive"),
        (dict(kv_offload_memory=10), "holds no KV block"),
    ):
        with pytest.raises(ValueError, match=message):
            LLM(str(path), dtype="float32", kv_cache_memory=1 << 20, **options)
