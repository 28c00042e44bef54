"""Several models behind one server, driven by the official ``openai`` SDK and by httpx.

One server serves the whole module: a tiny random Llama (``--model tiny=PATH``) and the
bundled demo model (from a ``--config`` TOML file with an option of its own), so each
request's routing, each model's options and each model's metrics can be told apart. Also
here: ``/tokenize``, ``/detokenize``, ``echo``, ``user`` and ``metadata``, and a start that
fails on one of several models.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tessera import LLM, SamplingParams
from tessera.demo_model import SERVED_NAME as DEMO
from tessera.demo_model import model_dir as demo_dir
from tests.test_serve_util import (
    SERVER_ENV,
    ServerProcess,
    build_server_model,
    child_pids,
    free_port,
    http,
    pid_alive,
)

pytestmark = pytest.mark.processes

MESSAGES = [{"role": "user", "content": "What is 12+7?"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_server_model(tmp_path_factory.mktemp("multi-tiny"))


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    config = tmp_path_factory.mktemp("multi-config") / "models.toml"
    # The demo model admits 2 sequences (its own option); tiny keeps the default.
    config.write_text(f'[models."{DEMO}"]\npath = {json.dumps(str(demo_dir()))}\n'
                      "max_num_seqs = 2\n")  # fmt: skip
    srv = ServerProcess(None, "--model", f"tiny={tiny_dir}", "--config", str(config),
                        "--max-waiting", "0", name=None)  # fmt: skip
    try:
        yield srv.wait_ready(timeout_s=240)
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def llms(tiny_dir):
    """Each model offline, as the server runs it."""
    return {
        name: LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=16 << 20)
        for name, path in (("tiny", tiny_dir), (DEMO, demo_dir()))
    }


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0) as c:
        yield c


def _chat_ids(llm: LLM) -> list[int]:
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return list(tok.encode(text, add_special_tokens=False))


def test_models_are_listed_and_retrieved(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny", DEMO]
    assert client.models.retrieve(DEMO).to_dict()["max_model_len"] == 256
    assert client.models.retrieve("tiny").to_dict()["max_model_len"] == 4096
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    r = http.get(f"{server.base_url}/v1/models/nope")
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "The model `nope` does not exist.", "type": "NotFoundError",
        "param": "model", "code": "model_not_found",
    }  # fmt: skip
    assert http.get(f"{server.base_url}/health").json() == {"status": "ok"}


def test_requests_route_to_their_model_and_match_it_offline(client, llms):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    extra = {"ignore_eos": True, "return_token_ids": True}
    for name, llm in llms.items():
        expected = llm.generate(["Hello there"], params, use_tqdm=False)[0].outputs[0]
        out = client.completions.create(model=name, prompt="Hello there", max_tokens=8,
                                        temperature=0, extra_body=extra)  # fmt: skip
        assert out.model == name
        assert out.choices[0].token_ids == expected.token_ids
        assert out.choices[0].text == expected.text
        chat_ids = _chat_ids(llm)
        expected = llm.generate([chat_ids], params, use_tqdm=False)[0].outputs[0]
        chat = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8,
                                              temperature=0, extra_body=extra)  # fmt: skip
        assert chat.model == name and chat.usage.prompt_tokens == len(chat_ids)
        assert chat.choices[0].token_ids == expected.token_ids
        assert chat.choices[0].message.content == expected.text


def test_unknown_or_missing_model(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=1)
    # With several models served, a request must say which.
    r = http.post(f"{server.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "tiny" in r.json()["error"]["message"]


def test_each_model_has_its_own_options_and_capacity(client):
    # The demo model's table set max_num_seqs = 2 (and --max-waiting 0): n=3 can never run
    # there; tiny runs it.
    with pytest.raises(openai.BadRequestError, match="at most 2"):
        client.completions.create(model=DEMO, prompt="x", max_tokens=1, n=3)
    assert len(client.completions.create(model="tiny", prompt="x", max_tokens=1, n=3).choices) == 3


def _series(text: str, name: str, model: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{model_name="{model}"'):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError((name, model))


def test_metrics_are_labelled_by_model(client, server):
    for name in ("tiny", DEMO):
        client.completions.create(model=name, prompt="count me", max_tokens=2)
    text = http.get(f"{server.base_url}/metrics").text
    for name in ("tiny", DEMO):
        assert _series(text, "tessera:generation_tokens_total", name) > 0
        assert _series(text, "tessera:e2e_request_latency_seconds_count", name) >= 1
        assert _series(text, "tessera:num_requests_running", name) >= 0
    # One HELP line per metric, however many models.
    assert text.count("# HELP tessera:generation_tokens_total ") == 1


def test_tokenize_and_detokenize(server, llms):
    url = server.base_url
    for name, llm in llms.items():
        tok = llm.get_tokenizer()
        r = http.post(f"{url}/tokenize", json={"model": name, "prompt": "Hello there",
                                               "add_special_tokens": False})  # fmt: skip
        assert r.status_code == 200, r.text
        out = r.json()
        ids = tok.encode("Hello there", add_special_tokens=False)
        assert out == {"count": len(ids), "max_model_len": 4096 if name == "tiny" else 256,
                       "tokens": ids}  # fmt: skip
        r = http.post(f"{url}/detokenize", json={"model": name, "tokens": ids})
        assert r.status_code == 200 and r.json() == {"prompt": "Hello there"}
        r = http.post(f"{url}/tokenize", json={"model": name, "prompt": "Hello there"})
        assert r.json()["tokens"] == tok.encode("Hello there")
        # A chat is tokenized as the chat endpoint renders it.
        r = http.post(f"{url}/tokenize", json={"model": name, "messages": MESSAGES})
        assert r.json()["tokens"] == _chat_ids(llm)
        vocab_size = llm.engine.runtime.vocab_size
        for bad in ([-1], [vocab_size], [2**70]):
            r = http.post(f"{url}/detokenize", json={"model": name, "tokens": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", r.text
    r = http.post(f"{url}/detokenize", json={"model": DEMO, "tokens": [5] * 257})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    for body, status in (
        ({"model": "tiny"}, 400),  # neither prompt nor messages
        ({"model": "tiny", "prompt": "x", "messages": MESSAGES}, 400),
        ({"model": "tiny", "messages": []}, 400),
        ({"model": "tiny", "prompt": "x" * (64 * 4096 + 1)}, 400),
        ({"model": "nope", "prompt": "x"}, 404),
        ({"prompt": "x"}, 400),  # several models: model is required
    ):
        r = http.post(f"{url}/tokenize", json=body)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_echo(client, llms):
    kwargs = dict(model="tiny", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(prompt="abc", **kwargs).choices[0].text
    out = client.completions.create(prompt="abc", echo=True, **kwargs)
    assert out.choices[0].text == "abc" + plain
    assert out.usage.completion_tokens == 6
    chunks = list(client.completions.create(prompt="abc", echo=True, stream=True, **kwargs))
    assert chunks[0].choices[0].text.startswith("abc")
    assert "".join(c.choices[0].text for c in chunks) == "abc" + plain
    # Token ids are echoed as their text; several prompts each echo their own.
    ids = llms["tiny"].get_tokenizer().encode("abc", add_special_tokens=False)
    out = client.completions.create(prompt=ids, echo=True, **kwargs)
    assert out.choices[0].text == "abc" + plain
    out = client.completions.create(prompt=["abc", "xyz"], echo=True, n=2, **kwargs)
    assert [c.text[:3] for c in out.choices] == ["abc", "abc", "xyz", "xyz"]
    # With logprobs, the prompt's come first (tests/test_serve.py checks their values).
    out = client.completions.create(prompt="abc", echo=True, logprobs=1, **kwargs)
    assert out.choices[0].logprobs.token_logprobs[0] is None
    assert len(out.choices[0].logprobs.tokens) == 6 + out.usage.prompt_tokens


def test_user_and_metadata_are_accepted_and_ignored(client, server):
    chat = client.chat.completions.create(model=DEMO, messages=MESSAGES, max_tokens=2,
                                          user="someone", metadata={"team": "a"})  # fmt: skip
    assert chat.choices[0].finish_reason in ("stop", "length")
    out = client.completions.create(model="tiny", prompt="x", max_tokens=2, user="someone",
                                    extra_body={"metadata": {"team": "a"}})  # fmt: skip
    assert out.choices[0].finish_reason in ("stop", "length")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1, "metadata": {"team": 1}}
    r = http.post(f"{server.base_url}/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("metadata")


def _processes_running(text: str) -> list[int]:
    """Processes whose command line holds ``text`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_a_model_that_fails_to_load_fails_the_start_naming_it(tmp_path):
    good = build_server_model(tmp_path / "good", chat_template=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["NopeForCausalLM"]}))
    cmd = [sys.executable, "-m", "tessera.cli", "serve", "--model", f"good={good}",
           "--model", f"broken={bad}", "--port", str(free_port()), "--device", "cpu",
           "--threads", "1", "--kv-cache-memory", str(16 << 20)]  # fmt: skip
    r = subprocess.run(cmd, env=SERVER_ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 2 and r.stderr.startswith("tessera: error: model 'broken':"), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    # The good model's core, started first, was stopped with the server.
    assert _processes_running(str(good)) == []
    # A bad option in the config file: one line naming it and its model, before any start.
    config = tmp_path / "models.toml"
    config.write_text(f"[models.a]\npath = {json.dumps(str(good))}\nmax_num_seq = 4\n")
    cmd = [sys.executable, "-m", "tessera.cli", "serve", "--config", str(config),
           "--port", str(free_port())]  # fmt: skip
    r = subprocess.run(cmd, env=SERVER_ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "model 'a'" in r.stderr and "'max_num_seq'" in r.stderr


def _core_of(server: ServerProcess, path: Path) -> int:
    """The engine core serving the model at ``path`` (its config names the directory)."""
    for pid in child_pids(server.proc.pid):
        if str(path) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return pid
    raise AssertionError(f"no core serves {path}")


def _until(cond, timeout_s: float) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline_s, "timed out"
        time.sleep(0.1)


def test_a_dead_core_makes_health_fail_while_the_other_model_serves(client, server):
    os.kill(_core_of(server, demo_dir()), signal.SIGKILL)

    def unhealthy() -> bool:
        r = http.get(f"{server.base_url}/health")
        return r.status_code == 503 and DEMO in r.json()["error"]["message"]

    _until(unhealthy, 30)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices
    # The core is replaced and the server is whole again.
    _until(lambda: http.get(f"{server.base_url}/health").status_code == 200, 180)
    assert client.completions.create(model=DEMO, prompt="x", max_tokens=2).model == DEMO


def test_sigterm_stops_every_core_and_exits_zero(server, tiny_dir):
    cores = [_core_of(server, tiny_dir), _core_of(server, demo_dir())]
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    _until(lambda: not any(pid_alive(pid) for pid in cores), 15)
