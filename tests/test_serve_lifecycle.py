"""Server start-up failures, API keys, the queue limit and graceful shutdown (a failing core:
``test_serve_chaos.py``).

Every server here runs as a subprocess and is stopped (or killed) by the test; none outlives it.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.test_serve_util import (
    SERVER_ENV,
    ServerProcess,
    build_server_model,
    free_port,
    http,
    pid_alive,
)

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_server_model(tmp_path_factory.mktemp("serve-life"), chat_template=False)


def _serve_cmd(model: str, port: int) -> list[str]:
    return [sys.executable, "-m", "tessera.cli", "serve", model, "--port", str(port),
            "--device", "cpu", "--threads", "1"]  # fmt: skip


def test_startup_errors_are_one_line(tmp_path, model_dir):
    # Not a model directory.
    r = subprocess.run(_serve_cmd(str(tmp_path / "missing"), free_port()), env=SERVER_ENV,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no config.json" in r.stderr
    # A model the engine core cannot load: the core reports it and is reaped.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["NopeForCausalLM"]}))
    r = subprocess.run(_serve_cmd(str(bad), free_port()), env=SERVER_ENV, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("tessera: error:"), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    # A port already in use.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(_serve_cmd(str(model_dir), port), env=SERVER_ENV,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert r.stderr.count("\n") == 1


def test_api_key_queue_limit_and_no_chat_template(model_dir):
    srv = ServerProcess(model_dir, "--api-key", "sekret", "--max-num-seqs", "1",
                        "--max-waiting", "0")  # fmt: skip
    try:
        srv.wait_ready()
        url = f"{srv.base_url}/v1/completions"
        good = {"Authorization": "Bearer sekret"}
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        assert http.post(url, json=body).status_code == 401
        r = http.post(url, json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        assert http.get(f"{srv.base_url}/v1/models").status_code == 401
        assert http.post(url, json=body, headers=good).status_code == 200
        # The tokenizer endpoints are behind the key too.
        for path, tok_body in (("tokenize", {"prompt": "hi"}), ("detokenize", {"tokens": [5]})):
            assert http.post(f"{srv.base_url}/{path}", json=tok_body).status_code == 401
            r = http.post(f"{srv.base_url}/{path}", json=tok_body, headers=good)
            assert r.status_code == 200, r.text
        # Health and metrics stay open.
        assert http.get(f"{srv.base_url}/health").status_code == 200
        # No chat template: a clear 400.
        r = http.post(
            f"{srv.base_url}/v1/chat/completions",
            headers=good,
            json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        # One sequence may run and none wait: a second request is refused with Retry-After.
        long = {"model": "tiny", "prompt": "hi", "max_tokens": 4000, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with http.stream("POST", url, json=long, headers=good) as r:
            lines = r.iter_lines()  # kept: dropping the iterator closes the stream
            assert next(lines).startswith("data: ")
            busy = http.post(url, json=body, headers=good)
            assert busy.status_code == 503 and "Retry-After" in busy.headers
            assert busy.json()["error"]["type"] == "ServiceUnavailableError"
    finally:
        srv.stop()


def test_sigterm_aborts_streams_and_exits_zero(model_dir):
    srv = ServerProcess(model_dir, "--shutdown-timeout", "0.2")
    try:
        srv.wait_ready()
        core_pid = srv.core_pid
        assert core_pid is not None and pid_alive(core_pid)
        body = {"model": "tiny", "prompt": "abc", "max_tokens": 4000, "ignore_eos": True,
                "stream": True}  # fmt: skip
        events: list[str] = []
        with http.stream("POST", f"{srv.base_url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        srv.proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "abort"
        assert srv.proc.wait(30) == 0
        deadline_s = time.monotonic() + 5
        while pid_alive(core_pid) and time.monotonic() < deadline_s:
            time.sleep(0.05)
        assert not pid_alive(core_pid)
    finally:
        srv.stop()


@pytest.mark.slow
def test_api_key_from_file_or_environment_and_metrics_behind_it(model_dir, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    srv = ServerProcess(model_dir, "--api-key-file", str(key_file), "--metrics-require-key")
    try:
        srv.wait_ready()
        assert "from-a-file" not in " ".join(srv.proc.args)  # type: ignore[arg-type]
        good = {"Authorization": "Bearer from-a-file"}
        assert http.get(f"{srv.base_url}/v1/models").status_code == 401
        assert http.get(f"{srv.base_url}/v1/models", headers=good).status_code == 200
        assert http.get(f"{srv.base_url}/metrics").status_code == 401
        assert http.get(f"{srv.base_url}/metrics", headers=good).status_code == 200
        assert http.get(f"{srv.base_url}/health").status_code == 200
    finally:
        srv.stop()
    # No --served-model-name either: the model is served under its directory's name, shows no
    # path, and still answers to the path it was started with.
    srv = ServerProcess(model_dir, env={"TESSERA_API_KEY": "from-the-env"}, name=None)
    try:
        srv.wait_ready()
        assert http.get(f"{srv.base_url}/v1/models").status_code == 401
        auth = {"Authorization": "Bearer from-the-env"}
        r = http.get(f"{srv.base_url}/v1/models", headers=auth)
        assert r.status_code == 200
        assert r.json()["data"][0]["id"] == model_dir.name and str(model_dir) not in r.text
        for model in (model_dir.name, str(model_dir)):
            body = {"model": model, "prompt": "hi", "max_tokens": 2}
            assert http.post(f"{srv.base_url}/v1/completions", json=body,
                             headers=auth).status_code == 200  # fmt: skip
        r = http.post(f"{srv.base_url}/v1/completions", json=body | {"model": "x"}, headers=auth)
        assert r.status_code == 404 and str(model_dir) not in r.text
        assert http.get(f"{srv.base_url}/metrics").status_code == 200  # open by default
    finally:
        srv.stop()
    # Bad key sources and limits end in one line before anything starts.
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for extra, fragment in (
        (["--api-key-file", str(tmp_path / "missing")], "cannot read --api-key-file"),
        (["--api-key-file", str(empty)], "holds no key"),
        (["--api-key", "a", "--api-key-file", str(key_file)], "not both"),
        (["--max-request-body-bytes", "0"], "--max-request-body-bytes must be at least 1"),
        (["--engine-stall-timeout", "nan"], "--engine-stall-timeout must be a positive"),
        (["--port", "70000"], "--port must be in 1..65535"),
    ):
        r = subprocess.run(_serve_cmd(str(model_dir), free_port()) + extra, env=SERVER_ENV,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and fragment in r.stderr, r.stderr
