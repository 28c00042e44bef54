"""``tessera serve`` with disaggregated workers: same tokens as ``LLM``; a request lost to a
killed FFN worker is an HTTP 500 (never a hang), the next one succeeds, and stopping the
server leaves no worker behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tessera import LLM, SamplingParams
from tests.test_serve_util import ServerProcess, build_server_model, child_pids, http, pid_alive

pytestmark = pytest.mark.processes


@pytest.mark.slow
def test_serve_disaggregated(tmp_path):
    model = build_server_model(tmp_path / "m")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = LLM(str(model), dtype="float32", device="cpu", kv_cache_memory=16 << 20).generate(
        ["Hello"], params, use_tqdm=False
    )[0].outputs[0].token_ids
    srv = ServerProcess(model, "--attention-workers", "1", "--ffn-workers", "1",
                        "--micro-batches", "2")
    workers: list[int] = []
    try:
        srv.wait_ready()
        body = dict(model="tiny", prompt="Hello", max_tokens=8, temperature=0, ignore_eos=True,
                    return_token_ids=True)
        r = http.post(f"{srv.base_url}/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == expected
        assert srv.core_pid is not None
        workers = child_pids(srv.core_pid)
        assert len(workers) == 2

        result: dict = {}

        def long_request() -> None:
            long = dict(body, max_tokens=4000)
            result["response"] = http.post(f"{srv.base_url}/v1/completions", json=long)

        thread = threading.Thread(target=long_request)
        thread.start()
        _wait_running(srv.base_url)  # mid-generation: running, thousands of tokens to go
        os.kill(workers[-1], signal.SIGKILL)  # the FFN worker (started last)
        thread.join(30)
        assert not thread.is_alive()
        response = result["response"]
        assert response.status_code == 500, response.text
        assert "worker pool failed" in response.json()["error"]["message"]

        r = http.post(f"{srv.base_url}/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == expected
        workers += child_pids(srv.core_pid)
    finally:
        srv.stop()
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in workers)


def _wait_running(base_url: str, timeout_s: float = 20.0) -> None:
    """Until the server's metrics show a request running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in http.get(f"{base_url}/metrics").text.splitlines():
            if line.startswith("tessera:num_requests_running{") and float(line.split()[-1]) >= 1:
                return
        time.sleep(0.02)
    raise AssertionError("the long request never started running")
