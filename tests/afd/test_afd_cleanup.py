"""Nothing left behind: a front killed by SIGKILL mid-generation leaves no worker, no shared-
memory plane and no ipc socket or temporary directory once its workers notice; a worker killed
by SIGKILL mid-stream fails only the requests in flight, and the restart removes what the dead
generation had on disk and in the KV cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tessera import LLM, SamplingParams
from tessera.config import AFDConfig
from tests.afd.conftest import worker_pids
from tests.test_serve_util import pid_alive

pytestmark = pytest.mark.processes

COMMON = dict(dtype="float32", device="cpu", kv_cache_memory=1 << 22, num_threads=1)
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)

# A front in its own process: it prints its pool's processes and files once tokens flow, then
# keeps generating until it is killed.
_FRONT = """
import json, sys
from tessera import LLM, SamplingParams
from tessera.config import AFDConfig
afd = AFDConfig(attention_workers=1, ffn_workers=2, heartbeat_interval_s=0.2)
llm = LLM(sys.argv[1], afd=afd, dtype="float32", device="cpu", kv_cache_memory=1 << 22,
          num_threads=1)
engine = llm.engine
engine.add_request("x", [5] * 4, SamplingParams(max_tokens=100000, ignore_eos=True))
while not engine.step_with_deltas().deltas:
    pass
pool = engine._pool
print(json.dumps({"pids": [p.pid for p in pool.procs.values()], "plane_dir": pool.plane_dir,
                  "ipc_dir": engine._ipc_dir}), flush=True)
while True:
    engine.step_with_deltas()
"""


def _wait_until(condition, timeout_s: float, what: str) -> None:
    end_s = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end_s, what
        time.sleep(0.05)


def test_a_killed_front_leaves_nothing_behind(model_factory, tmp_path):
    path, _ = model_factory("llama")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=os.pathsep.join(sys.path))
    front = subprocess.Popen([sys.executable, "-c", _FRONT, str(path)], env=env,
                             stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        assert front.stdout is not None
        pool = json.loads(front.stdout.readline())
        pids = pool["pids"]
        assert pool["plane_dir"] is not None and Path(pool["plane_dir"]).is_dir()
        assert Path(pool["ipc_dir"]).is_dir() and Path(pool["ipc_dir"]).parent == tmp
        front.kill()  # SIGKILL, mid-generation
        front.wait()
        # The workers see their parent gone at their next heartbeat, clean up and exit.
        _wait_until(lambda: not any(pid_alive(p) for p in pids), 60,
                    "workers outlived their front")
        assert not Path(pool["plane_dir"]).exists()
        assert list(tmp.iterdir()) == []  # the front's ipc directory and sockets
    finally:
        front.kill()
        for pid in pids:  # only if the test failed
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _kill_mid_stream(engine, victim: str) -> tuple[float, list]:
    """Start two long requests, SIGKILL ``victim`` once tokens flow; returns the time to
    detection and the finished outputs."""
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    tag = f"{victim}-{engine._generation}"
    engine.add_request(f"x{tag}", [5] * 4, long)
    engine.add_request(f"y{tag}", [9] * 20, long)
    while not any(d.request_id == f"x{tag}" for d in engine.step_with_deltas().deltas):
        pass
    os.kill(engine._pool.procs[f"{victim}.g{engine._generation}"].pid, signal.SIGKILL)
    start_s = time.monotonic()
    finished = []
    while engine.has_unfinished_requests():
        finished += engine.step()
    return time.monotonic() - start_s, finished


@pytest.mark.slow
def test_killed_workers_leave_nothing_behind(model_factory):
    path, _ = model_factory("llama")
    reference = LLM(str(path), **COMMON).generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    afd = AFDConfig(attention_workers=1, ffn_workers=1, heartbeat_interval_s=0.2,
                    failure_detect_s=2.0)
    llm = LLM(str(path), afd=afd, **COMMON)
    engine = llm.engine
    try:
        for victim in ("attn0", "ffn0"):
            pool = engine._pool
            files = [Path(pool.plane_dir)] + [
                Path(cfg.input_address.removeprefix("ipc://")) for cfg in pool.attention]
            assert all(f.exists() for f in files)
            detect_s, finished = _kill_mid_stream(engine, victim)
            assert detect_s < 2.0 + 1.5, detect_s
            assert len(finished) == 2
            for out in finished:
                comp = out.outputs[0]
                assert comp.finish_reason == "error" and victim in (comp.error or ""), comp
            # The dead generation's plane and ipc sockets are gone with it.
            assert not any(f.exists() for f in files), files
            again = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
            assert again[0].outputs[0].token_ids == reference[0].outputs[0].token_ids
            assert engine.stats().kv_cache_usage == 0.0
        assert engine.num_recoveries == 2
    finally:
        llm.close()
    assert worker_pids() == []
    assert not Path(engine._ipc_dir).exists()
