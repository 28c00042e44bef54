"""Failures: a killed or stalled FFN worker is detected within the bound, in-flight requests
end with an error (never a hang, never wrong tokens as success), the pool restarts and new
requests succeed; startup errors give one clear message and leave no processes behind."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tessera import LLM, SamplingParams
from tessera.afd.front import WorkerStartupError
from tessera.config import AFDConfig
from tests.afd.conftest import worker_pids

pytestmark = pytest.mark.processes

COMMON = dict(dtype="float32", device="cpu", kv_cache_memory=1 << 22, num_threads=1)
DETECT_S = 2.0
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


def _fail_and_recover(engine, victim: str, sig: int) -> None:
    """Start two long requests, hit ``victim`` with ``sig`` mid-generation, and check that
    both end with an error naming it, within the detection bound."""
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    engine.add_request(f"x{sig}", [5] * 4, long)
    engine.add_request(f"y{sig}", [9] * 20, long)
    while not any(d.request_id == f"x{sig}" for d in engine.step_with_deltas().deltas):
        pass
    os.kill(engine._pool.procs[f"{victim}.g{engine._generation}"].pid, sig)
    start = time.monotonic()
    finished = []
    while engine.has_unfinished_requests():
        finished += engine.step()
    detect_s = time.monotonic() - start
    # Within the bound; the slack covers polling and a loaded test machine.
    assert detect_s < DETECT_S + 1.5, detect_s
    assert {o.request_id for o in finished} == {f"x{sig}", f"y{sig}"}
    for out in finished:
        comp = out.outputs[0]
        assert comp.finish_reason == "error" and victim in (comp.error or ""), comp
        assert len(comp.token_ids) < 400
    # As the server does after every step: stats while the new pool comes up must not
    # swallow its start-up messages.
    for _ in range(20):
        engine.stats()
        time.sleep(0.05)


@pytest.mark.slow
def test_dead_then_stalled_ffn_worker(model_factory):
    path, _ = model_factory("llama")
    afd = AFDConfig(attention_workers=1, ffn_workers=2, heartbeat_interval_s=0.2,
                    failure_detect_s=DETECT_S, transfer_timeout_s=30.0)
    reference = LLM(str(path), **COMMON).generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    llm = LLM(str(path), afd=afd, **COMMON)
    engine = llm.engine
    try:
        # A killed worker: its process exits (or its peers see the connection drop).
        _fail_and_recover(engine, "ffn1", signal.SIGKILL)
        # A stalled worker: alive but silent; found by its missing heartbeats.
        _fail_and_recover(engine, "ffn0", signal.SIGSTOP)
        assert engine.num_recoveries == 2
        # The new pool is up with an empty cache, and serves correctly.
        again = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
        assert again[0].outputs[0].finish_reason == "length"
        assert again[0].outputs[0].token_ids == reference[0].outputs[0].token_ids
        assert engine.stats().kv_cache_usage == 0.0  # blocks of the failed requests are gone
    finally:
        llm.close()
    assert worker_pids() == []


def test_bad_values_give_one_clear_error(model_factory):
    path, _ = model_factory("llama")
    with pytest.raises(ValueError, match="ffn_workers must be an integer of at least 1"):
        LLM(str(path), attention_workers=1, ffn_workers=-1, **COMMON)
    with pytest.raises(ValueError, match="micro_batches must be an integer"):
        LLM(str(path), attention_workers=1, ffn_workers=1, micro_batches=0, **COMMON)
    with pytest.raises(ValueError, match=r"ffn_workers \(129\) exceeds the FFN intermediate"):
        LLM(str(path), attention_workers=1, ffn_workers=129, **COMMON)
    assert worker_pids() == []


def test_port_in_use_gives_one_clear_error(model_factory):
    path, _ = model_factory("llama")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The rendezvous port belongs to the torch.distributed plane.
        afd = AFDConfig(attention_workers=1, ffn_workers=1, master_port=port, data_plane="torch")
        with pytest.raises(WorkerStartupError) as info:
            LLM(str(path), afd=afd, **COMMON)
    message = str(info.value)
    assert message == f"attn0: data-plane rendezvous port {port} is already in use", message
    assert worker_pids() == []
