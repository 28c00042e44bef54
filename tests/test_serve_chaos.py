"""Chaos for the engine core behind a running server: SIGKILL and SIGSTOP mid-stream.

Each case asserts that the failure is noticed within a bound, that the requests in flight end
with a proper error (an error event and ``[DONE]`` for a stream, HTTP 500 otherwise), that the
server replaces the core (or exits non-zero when told to) and serves again with no KV blocks
held, and that the dead core left no socket file behind.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.test_serve_util import ServerProcess, build_server_model, http, pid_alive

pytestmark = [pytest.mark.processes, pytest.mark.slow]

LONG = {"model": "tiny", "prompt": "abc", "max_tokens": 4000, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_server_model(tmp_path_factory.mktemp("serve-chaos"), chat_template=False)


def _wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``cond`` until true; returns the seconds it took (fails after ``timeout_s``)."""
    start_s = time.monotonic()
    while not cond():
        assert time.monotonic() - start_s < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start_s


def _healthy(srv: ServerProcess) -> bool:
    try:
        return httpx.get(f"{srv.base_url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


class _Stream:
    """A long streamed completion read on a thread; ``events`` holds its parsed data lines."""

    def __init__(self, srv: ServerProcess) -> None:
        self.events: list[dict | str] = []
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(srv,), daemon=True)
        self.thread.start()

    def _run(self, srv: ServerProcess) -> None:
        body = LONG | {"stream": True}
        with http.stream("POST", f"{srv.base_url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[6:]
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                    self.first.set()

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the stream did not end"


def _assert_ended_with_error(stream: _Stream) -> None:
    assert stream.events[-1] == "[DONE]", stream.events[-3:]
    err = stream.events[-2]
    assert isinstance(err, dict) and err["error"]["code"] == 500, err
    assert "engine core" in err["error"]["message"]


def _assert_serves_again(srv: ServerProcess, old_core: int) -> None:
    _wait_for(lambda: _healthy(srv), 180, "the restarted core")
    new_core = srv.current_core_pid()
    assert new_core is not None and new_core != old_core and not pid_alive(old_core)
    r = http.post(f"{srv.base_url}/v1/completions", json={"model": "tiny", "prompt": "hi",
                                                           "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    _wait_for(lambda: srv.metric("tessera:kv_cache_usage_perc") == 0.0, 30, "KV blocks freed")


def _socket_files(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.rglob("*") if p.is_socket())


def test_killed_core_fails_its_streams_and_is_replaced(model_dir, tmp_path):
    srv = ServerProcess(model_dir, env={"TMPDIR": str(tmp_path)})
    try:
        srv.wait_ready()
        old = srv.current_core_pid()
        assert old is not None
        assert _socket_files(tmp_path) == ["input-1", "output"]
        stream = _Stream(srv)
        assert stream.first.wait(60)
        os.kill(old, signal.SIGKILL)
        stream.join(30)  # a dead core is seen within the watchdog's period
        _assert_ended_with_error(stream)
        _assert_serves_again(srv, old)
        # The dead core's input socket file is gone; the new one's is there.
        assert _socket_files(tmp_path) == ["input-2", "output"]
    finally:
        srv.stop()
    assert srv.proc.returncode == 0


def test_stopped_core_is_noticed_and_replaced(model_dir):
    srv = ServerProcess(model_dir, "--engine-stall-timeout", "2")
    try:
        srv.wait_ready()
        old = srv.current_core_pid()
        assert old is not None
        result: dict[str, httpx.Response] = {}

        def plain() -> None:
            result["r"] = http.post(f"{srv.base_url}/v1/completions", json=LONG)

        stream = _Stream(srv)
        assert stream.first.wait(60)
        thread = threading.Thread(target=plain, daemon=True)
        thread.start()
        _wait_for(lambda: srv.metric("tessera:num_requests_running") == 2, 30, "two running")
        os.kill(old, signal.SIGSTOP)  # alive, holding its sockets, making no progress
        # Detection: the stall timeout (2 s, or 10 warm-ups of this tiny model) and a margin.
        stream.join(60)
        thread.join(30)
        _assert_ended_with_error(stream)
        r = result["r"]
        assert r.status_code == 500 and "no progress" in r.json()["error"]["message"]
        _assert_serves_again(srv, old)
    finally:
        srv.stop()


def test_exit_on_engine_failure_exits_nonzero(model_dir):
    srv = ServerProcess(model_dir, "--exit-on-engine-failure")
    try:
        srv.wait_ready()
        old = srv.current_core_pid()
        assert old is not None
        stream = _Stream(srv)
        assert stream.first.wait(60)
        os.kill(old, signal.SIGKILL)
        stream.join(30)
        _assert_ended_with_error(stream)
        srv.proc.wait(60)
        assert srv.proc.returncode == 1
        stderr = srv.proc.stderr.read()  # type: ignore[union-attr]
        assert "exit-on-engine-failure" in stderr and "Traceback" not in stderr
    finally:
        srv.stop()


def _shm_entries() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith("tessera")} if shm.is_dir() else set()


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        p = stack.pop()
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}").exists() else []:
            kids = [int(c) for c in (task / "children").read_text().split()]
            found += kids
            stack += kids
    return found


def test_killed_core_of_a_disaggregated_server_leaves_nothing_behind(model_dir, tmp_path):
    before = _shm_entries()
    srv = ServerProcess(model_dir, "--attention-workers", "1", "--ffn-workers", "1",
                        env={"TMPDIR": str(tmp_path)})  # fmt: skip
    try:
        srv.wait_ready(timeout_s=300)
        old = srv.current_core_pid()
        assert old is not None
        workers = [p for p in _descendants(old) if p != old]
        assert len(workers) >= 2  # one attention and one FFN worker (and what they spawned)
        pool_shm = _shm_entries() - before
        assert pool_shm  # local CPU workers exchange hidden states in shared memory
        stream = _Stream(srv)
        assert stream.first.wait(120)
        os.kill(old, signal.SIGKILL)
        stream.join(60)
        _assert_ended_with_error(stream)
        # The orphaned workers notice their front is gone, clean up and exit.
        _wait_for(lambda: not any(pid_alive(p) for p in workers), 60, "the old workers to exit")
        _wait_for(lambda: not (pool_shm & _shm_entries()), 30, "the old pool's shared memory")
        _assert_serves_again(srv, old)
    finally:
        srv.stop()
    _wait_for(lambda: _shm_entries() <= before, 60, "the last pool's shared memory")
    assert _socket_files(tmp_path) == []
