"""The host KV store: engines share one host tier through it, and a store that dies, stalls
or holds another layout never takes an engine down or gives it wrong KV."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tessera import LLM, SamplingParams
from tessera.engine.model_runner import ModelRunner
from tessera.kv.store import Store
from tessera.messages.kv_store import (
    Acquire,
    Attach,
    BlockRef,
    Commit,
    Done,
    Lookup,
    Pin,
    Reserve,
    Unpin,
)
from tests.models import reference_gaps
from tests.test_kv_tiers import _check, _prompts

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
START_TIMEOUT_S = 120.0


# ----------------------------------------------------------------------------- the index
def _ref(i: int) -> BlockRef:
    return BlockRef(bytes([i]) * 16, bytes(16), [i, i + 1])


def test_store_hands_out_committed_slots_and_bumps_generations_on_reuse(tmp_path):
    store = Store(capacity_bytes=2 * (64 + 8))  # two slots of 64 bytes
    assert store.handle(Lookup([_ref(1).key])).message == "attach first"
    store.handle(Attach("fp", 64))
    try:
        (r1,) = store.handle(Reserve([_ref(1)])).slots
        assert r1 is not None and r1[1] % 2 == 1  # odd while written
        assert store.handle(Lookup([_ref(1).key])).num_keys == 0  # not committed yet
        assert store.handle(Reserve([_ref(1)])).slots == [None]  # already being written
        store.handle(Commit([(_ref(1).key, r1[0], r1[1])]))
        assert store.handle(Lookup([_ref(1).key, _ref(2).key])).num_keys == 1
        (a1,) = store.handle(Acquire([_ref(1)])).slots
        assert a1 == (r1[0], r1[1] + 1)  # even once committed
        # Another parent or other tokens under the same key are not handed out.
        assert store.handle(Acquire([BlockRef(_ref(1).key, bytes(16), [9])])).slots == []
        for i in (2, 3):  # the third block evicts the least recently used (block 1)
            (r,) = store.handle(Reserve([_ref(i)])).slots
            store.handle(Commit([(_ref(i).key, r[0], r[1])]))
        assert store.handle(Lookup([_ref(1).key])).num_keys == 0
        assert store.arena is not None and store.arena.generations[a1[0]] != a1[1]
        # A commit for a slot taken back meanwhile does nothing.
        store.handle(Commit([(_ref(1).key, r1[0], r1[1])]))
        assert store.handle(Lookup([_ref(1).key])).num_keys == 0
        assert store.handle(Attach("other", 64)).message.startswith("the store holds another")
    finally:
        store.close()
    assert not Path(store.arena.path).exists()


def test_abandoned_reservations_are_taken_back(monkeypatch):
    store = Store(capacity_bytes=64 + 8)
    store.handle(Attach("fp", 64))
    try:
        assert store.handle(Reserve([_ref(1)])).slots[0] is not None
        assert store.handle(Reserve([_ref(2)])).slots == [None]  # the one slot is reserved
        monkeypatch.setattr("tessera.kv.store.RESERVATION_TIMEOUT_S", 0.0)
        assert store.handle(Reserve([_ref(2)])).slots[0] is not None
    finally:
        store.close()


def _put(store: Store, i: int) -> None:
    (r,) = store.handle(Reserve([_ref(i)])).slots
    store.handle(Commit([(_ref(i).key, r[0], r[1])]))


def test_pinned_blocks_are_not_evicted_until_unpinned_or_their_lease_ends(monkeypatch):
    store = Store(capacity_bytes=2 * (64 + 8))  # two slots
    store.handle(Attach("fp", 64))
    try:
        _put(store, 1)
        _put(store, 2)
        # Pinned before and after commit: a lease may come before the block does.
        assert store.handle(Pin([_ref(1).key, _ref(7).key], 30.0)) == Done()
        _put(store, 3)  # evicts 2, the least recently used block not pinned
        assert store.handle(Lookup([_ref(1).key])).num_keys == 1
        assert store.handle(Lookup([_ref(2).key])).num_keys == 0
        assert store.handle(Pin([_ref(3).key], 30.0)) == Done()
        # Every block pinned: a writer gets no slot rather than a pinned block's.
        assert store.handle(Reserve([_ref(4)])).slots == [None]
        assert store.handle(Unpin([_ref(3).key])) == Done()
        _put(store, 4)
        assert store.handle(Lookup([_ref(3).key])).num_keys == 0
        assert store.handle(Lookup([_ref(1).key])).num_keys == 1
        # A lease that ended no longer protects its block.
        monkeypatch.setattr("tessera.kv.store.time.monotonic", lambda: time.time() + 1e6)
        _put(store, 5)
        assert store.handle(Lookup([_ref(1).key])).num_keys == 0
        # Leases are bounded.
        assert store.handle(Pin([_ref(5).key], 0.0)).message.startswith("a lease is over 0")
        assert store.handle(Pin([_ref(5).key], 1e9)).message.startswith("a lease is over 0")
        many = [bytes([i % 256, i // 256]) * 8 for i in range(20)]
        assert store.handle(Pin(many, 30.0)).message == "too many pinned blocks"
    finally:
        store.close()


# ----------------------------------------------------------------------------- the process
def _start_store(address: str, memory: int, ready: Path) -> subprocess.Popen:
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "tessera.kv.store", "--address", address,
                             "--memory", str(memory), "--ready-file", str(ready)])
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.exists():
        assert proc.poll() is None, "the store exited while starting"
        assert time.monotonic() < deadline, "the store did not start"
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _host(llm: LLM):
    return {t.tier: t for t in llm.engine.stats().kv_tiers}["host"]


def _llm(path, address: str, num_blocks: int = 12) -> LLM:
    probe = LLM(str(path), dtype="float32", kv_cache_memory=1 << 20)
    per_block = ModelRunner.kv_bytes_per_block(probe.engine.model, 16)
    return LLM(str(path), dtype="float32", kv_cache_memory=num_blocks * per_block,
               max_num_batched_tokens=64, kv_host_store=address)


@pytest.mark.processes
def test_engines_share_the_store_and_survive_its_death(model_factory, tmp_path, caplog):
    path, hf = model_factory("deepseek-v3-moe")
    address = f"ipc://{tmp_path}/store.sock"
    ready = tmp_path / "ready"
    store = _start_store(address, 64 << 20, ready)
    try:
        prompts = _prompts(11)
        a = _llm(path, address)
        _check(hf, prompts, a.generate(prompts, PARAMS, use_tqdm=False))
        # A second engine finds the first one's blocks in the shared tier.
        b = _llm(path, address)
        _check(hf, prompts, b.generate(prompts, PARAMS, use_tqdm=False))
        assert _host(b).num_hit_tokens_total > 0

        # The store is killed: engines recompute, with one warning each, and go on.
        store.send_signal(signal.SIGKILL)
        store.wait(30)
        with caplog.at_level(logging.WARNING, logger="tessera.kv.shared_host_tier"):
            hits = _host(b).num_hit_tokens_total
            _check(hf, prompts, b.generate(prompts, PARAMS, use_tqdm=False))
            assert _host(b).num_hit_tokens_total == hits
        assert caplog.text.count("running without the shared host tier") == 1

        # A new store at the same address: the engine reattaches by itself.
        store = _start_store(address, 64 << 20, ready)
        stale = [p for p in Path("/dev/shm").glob("tessera-kv-*")
                 if p.name.split("-")[2] != str(store.pid)]
        assert not stale, "the killed store's arena was not removed"
        deadline = time.monotonic() + 120
        while _host(b).num_hit_tokens_total == hits:
            assert time.monotonic() < deadline, "the engine did not reattach"
            outputs = b.generate(prompts, PARAMS, use_tqdm=False)
            _check(hf, prompts, outputs)
        for llm in (a, b):
            assert llm.engine.block_manager.num_free_blocks == llm.engine.runtime.num_kv_blocks
            llm.close()
    finally:
        _stop(store)


@pytest.mark.processes
def test_store_of_another_layout_is_not_used(model_factory, tmp_path, caplog):
    path_a, _ = model_factory("llama")
    path_b, hf_b = model_factory("llama", seed=7)
    address = f"ipc://{tmp_path}/store.sock"
    store = _start_store(address, 16 << 20, tmp_path / "ready")
    try:
        prompts = _prompts(12)
        _llm(path_a, address).generate(prompts, PARAMS, use_tqdm=False)
        with caplog.at_level(logging.WARNING, logger="tessera.kv.shared_host_tier"):
            b = _llm(path_b, address)
        assert "refused this engine" in caplog.text
        outputs = b.generate(prompts, PARAMS, use_tqdm=False)
        for prompt, out in zip(prompts, outputs, strict=True):
            assert max(reference_gaps(hf_b, prompt, out.outputs[0].token_ids)) <= 1e-4
        assert _host(b).num_hit_tokens_total == 0
    finally:
        _stop(store)


@pytest.mark.processes
def test_garbage_frames_get_an_error_and_the_store_stays_up(tmp_path):
    import zmq

    address = f"ipc://{tmp_path}/store.sock"
    store = _start_store(address, 1 << 20, tmp_path / "ready")
    ctx = zmq.Context()
    try:
        for frame in (b"", b"\xff" * 100, os.urandom(5000)):
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            sock.send(frame)
            assert sock.poll(30_000), "the store did not answer"
            assert b"malformed" in sock.recv()
            sock.close()
        assert store.poll() is None
        # Only the owner may connect.
        assert Path(address.removeprefix("ipc://")).stat().st_mode & 0o077 == 0
    finally:
        ctx.term()
        _stop(store)
