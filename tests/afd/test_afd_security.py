"""The worker pool admits only its own: junk, forged, unsigned or oversized frames pushed by a
rogue ZeroMQ peer to the front's socket or an attention worker's input are dropped (the front
logs each kind once) and the pool goes on serving the same tokens."""

from __future__ import annotations

import logging
import os
import time

import msgspec
import pytest
import zmq

from tessera import LLM, SamplingParams
from tessera.afd.frames import FRONT_SENDER, PREFIX_BYTES, FrameWriter, new_secret
from tessera.config import AFDConfig
from tessera.messages.common import AbortRequests, Shutdown
from tessera.messages.workers import StepFailed
from tests.afd.conftest import worker_pids

pytestmark = pytest.mark.processes

COMMON = dict(dtype="float32", device="cpu", kv_cache_memory=1 << 22, num_threads=1)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[1, 2, 3], [7] * 11]


def _junk(limit_bytes: int, worker: str) -> list[bytes]:
    """One frame of each kind a rogue peer might send."""
    unsigned = [msgspec.msgpack.encode(m) for m in (Shutdown(), StepFailed(worker, "forged"),
                                                    AbortRequests(["0"]))]
    other_pool = FrameWriter(new_secret(), 0, FRONT_SENDER, limit_bytes)
    signed_elsewhere = [other_pool.seal(Shutdown()), other_pool.seal(StepFailed(worker, "x"))]
    forged = bytearray(signed_elsewhere[0])
    forged[0] ^= 0xFF
    return [b"", b"\x00", os.urandom(41), os.urandom(4096), *unsigned, *signed_elsewhere,
            bytes(forged), b"\x00" * (limit_bytes + 1)]


def _tokens(llm: LLM) -> list[list[int]]:
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.slow
def test_rogue_frames_are_dropped_and_the_pool_serves_on(model_factory, caplog):
    path, _ = model_factory("llama")
    afd = AFDConfig(attention_workers=1, ffn_workers=1, heartbeat_interval_s=0.2,
                    failure_detect_s=2.0)
    llm = LLM(str(path), afd=afd, **COMMON)
    engine = llm.engine
    ctx = zmq.Context()
    caplog.set_level(logging.WARNING, logger="tessera.afd.frames")
    try:
        before = _tokens(llm)
        limit_bytes = engine._link.frame_limit_bytes
        targets = [engine._link.front_address, engine._pool.attention[0].input_address]
        rogues = []
        for address in targets:
            rogue = ctx.socket(zmq.PUSH)
            rogue.setsockopt(zmq.LINGER, 0)
            rogue.connect(address)
            rogues.append(rogue)
            for _ in range(20):
                for frame in _junk(limit_bytes, "attn0.g0"):
                    rogue.send(frame)
        # Until the front has taken in (and dropped) the junk it was sent. ZeroMQ itself
        # drops the oversized frame (and the connection, which the rogue then re-opens).
        junk = _junk(limit_bytes, "attn0.g0")
        expected = {
            "truncated": 20 * sum(len(f) < PREFIX_BYTES for f in junk),
            "bad MAC (forged, or not from this pool)":
                20 * sum(PREFIX_BYTES <= len(f) <= limit_bytes for f in junk),
        }
        drops = engine._reader.drops.counts
        end_s = time.monotonic() + 60
        while drops != expected:
            assert time.monotonic() < end_s, drops
            engine.stats()
            time.sleep(0.05)
        # Every kind once in the log, not once per frame.
        assert len(caplog.records) == len(drops), [r.getMessage() for r in caplog.records]
        # The same tokens as before; no worker was shut down or failed by the junk.
        assert _tokens(llm) == before
        assert _tokens(llm) == before
        assert engine.num_recoveries == 0 and engine._generation == 0
        for rogue in rogues:
            rogue.close()
    finally:
        ctx.destroy(linger=0)
        llm.close()
    assert worker_pids() == []
