"""The OpenAI-compatible server, driven by the official ``openai`` SDK and by httpx.

One server subprocess (a tiny random Llama with a chat template) serves the whole module.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tessera import LLM, SamplingParams
from tests.test_serve_util import CHAT_TEMPLATE, ServerProcess, build_server_model, http

pytestmark = pytest.mark.processes

PROMPTS = ["Hello, my name is", "The capital of France is", "1 + 1 ="]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_server_model(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess(model_dir)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory=16 << 20)


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0) as c:
        yield c


def test_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completions_greedy_equal_llm_generate(client, llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, exp in zip(PROMPTS, expected, strict=True):
        out = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )  # fmt: skip
        choice = out.choices[0]
        assert choice.token_ids == exp.outputs[0].token_ids
        assert choice.text == exp.outputs[0].text
        assert choice.finish_reason == "length"
        assert out.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert out.usage.completion_tokens == 12


def test_completions_stream_equals_non_stream(client):
    kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[
        0
    ].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_token_id_prompts_and_lists(client, llm):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ids = [[5, 6, 7, 8], [40, 41]]
    expected = llm.generate(ids, params, use_tqdm=False)
    out = client.completions.create(
        model="tiny", prompt=ids, max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert [c.token_ids for c in out.choices] == [e.outputs[0].token_ids for e in expected]
    assert out.usage.prompt_tokens == 6 and out.usage.completion_tokens == 12
    texts = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=3, n=2)
    assert [c.index for c in texts.choices] == [0, 1, 2, 3]
    assert texts.usage.completion_tokens == 12


def test_chat_greedy_equals_llm_generate(client, llm):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    tok = llm.get_tokenizer()
    prompt_ids = tok.encode(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert tok.chat_template == CHAT_TEMPLATE
    exp = llm.generate(
        [prompt_ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )[0]
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=8, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert out.choices[0].token_ids == exp.outputs[0].token_ids
    assert out.choices[0].message.content == exp.outputs[0].text
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == 8

    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == exp.outputs[0].text
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_logprobs_and_seed(client):
    messages = [{"role": "user", "content": "hi"}]
    kwargs = dict(model="tiny", messages=messages, max_tokens=5, temperature=1.0, seed=7)
    a = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=3)
    b = client.chat.completions.create(**kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content
    content = a.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.logprob <= item.top_logprobs[0].logprob + 1e-6


def test_completion_logprobs_and_stop(client):
    out = client.completions.create(model="tiny", prompt="abc", max_tokens=4, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    # A stop string cut from the greedy text ends the completion there, streamed or not.
    base = (
        client.completions.create(
            model="tiny",
            prompt="abc",
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    stop = next((base[i : i + 2] for i in range(3, len(base) - 1) if base[i : i + 2].strip()), None)
    if stop is None:
        pytest.skip("greedy text has no usable stop string")
    cut = base[: base.index(stop)]
    out = client.completions.create(
        model="tiny", prompt="abc", max_tokens=16, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt="abc", max_tokens=16, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_echo_with_logprobs(client, llm):
    """The prompt's logprobs come first (null for its first token), then the generated
    tokens'; streamed, the prompt's part is in the first chunk."""
    kwargs = dict(model="tiny", prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=2,
                  echo=True, extra_body={"ignore_eos": True})
    ref = llm.generate([PROMPTS[1]], SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2, logprobs=2),
        use_tqdm=False)[0]
    prompt_ids, num_prompt = ref.prompt_token_ids, len(ref.prompt_token_ids)
    out = client.completions.create(**kwargs)
    choice = out.choices[0]
    assert choice.text == PROMPTS[1] + ref.outputs[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == num_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j in range(1, num_prompt):
        assert lp.token_logprobs[j] == pytest.approx(
            ref.prompt_logprobs[j][prompt_ids[j]], abs=1e-4)
        assert 1 <= len(lp.top_logprobs[j]) <= 2
    for j, tok in enumerate(ref.outputs[0].token_ids):
        assert lp.token_logprobs[num_prompt + j] == pytest.approx(
            ref.outputs[0].logprobs[j][tok], abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert lp.text_offset[num_prompt] == len(PROMPTS[1])

    chunks = list(client.completions.create(**kwargs, stream=True))
    first = chunks[0].choices[0]
    assert first.text.startswith(PROMPTS[1])
    assert len(first.logprobs.tokens) == num_prompt + 1
    assert first.logprobs.token_logprobs[0] is None
    streamed = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and len(streamed) == len(lp.token_logprobs)
    assert streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    # Streamed offsets count each token's text, as the whole response's do.
    offsets = [v for c in chunks for v in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_prompt_logprobs_field(client, llm):
    """vLLM's ``prompt_logprobs``: top-level on chat, per choice on completions; each
    position null (the first) or ``{token id: {logprob, rank, decoded_token}}``."""
    messages = [{"role": "user", "content": "hi there"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=2,
        extra_body={"prompt_logprobs": 2, "return_token_ids": True})
    extra = chat.model_extra
    prompt_ids, plp = extra["prompt_token_ids"], extra["prompt_logprobs"]
    assert len(plp) == len(prompt_ids) == chat.usage.prompt_tokens and plp[0] is None
    ref = llm.generate([prompt_ids], SamplingParams(max_tokens=1, prompt_logprobs=2),
                       use_tqdm=False)[0]
    for j in range(1, len(prompt_ids)):
        entry = plp[j]
        mine = entry[str(prompt_ids[j])]
        assert mine["logprob"] == pytest.approx(ref.prompt_logprobs[j][prompt_ids[j]], abs=1e-4)
        assert mine["rank"] == ref.prompt_token_ranks[j]
        assert isinstance(mine["decoded_token"], str)
        ranks = sorted(v["rank"] for k, v in entry.items() if k != str(prompt_ids[j]))
        assert len(entry) in (2, 3) and {1, 2} <= set(ranks) | {mine["rank"]}
    out = client.completions.create(model="tiny", prompt=["ab", "cd"], max_tokens=2,
                                    extra_body={"prompt_logprobs": 0})
    for c in out.choices:
        entries = c.model_extra["prompt_logprobs"]
        assert entries[0] is None and all(len(e) == 1 for e in entries[1:])
    assert "prompt_logprobs" not in (chat.choices[0].model_extra or {})
    plain = client.completions.create(model="tiny", prompt="ab", max_tokens=2)
    assert "prompt_logprobs" not in (plain.choices[0].model_extra or {})
    for stream_body, endpoint in (
        ({"messages": messages, "stream": True}, "chat/completions"),
        ({"prompt": "ab", "stream": True}, "completions"),
    ):
        r = http.post(f"{client.base_url}{endpoint}",
                      json={"model": "tiny", "prompt_logprobs": 1} | stream_body)
        assert r.status_code == 400 and "prompt_logprobs" in r.json()["error"]["message"]
    for bad in (21, -1):
        with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
            client.completions.create(model="tiny", prompt="ab",
                                      extra_body={"prompt_logprobs": bad})


def test_errors_have_openai_shape(server):
    url = f"{server.base_url}/v1"
    cases = [
        ("completions", b"{not json", 400),
        ("completions", {"model": "tiny"}, 400),  # no prompt
        ("completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400),
        ("completions", {"model": "tiny", "prompt": "x", "top_p": 2}, 400),
        ("completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400),
        ("completions", {"model": "tiny", "prompt": [1, 99999]}, 400),
        ("completions", {"model": "tiny", "prompt": [1] * 4096}, 400),
        ("completions", {"model": "nope", "prompt": "x"}, 404),
        ("chat/completions", {"model": "tiny", "messages": []}, 400),
        ("chat/completions", {"model": "tiny", "messages": [{"content": "x"}]}, 400),
    ]
    for path, body, status in cases:
        if isinstance(body, bytes):
            r = http.post(
                f"{url}/{path}", content=body, headers={"content-type": "application/json"}
            )
        else:
            r = http.post(f"{url}/{path}", json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    r = http.post(f"{url}/completions", json={"model": "tiny", "prompt": "x", "temperature": -1})
    assert "temperature must be non-negative" in r.json()["error"]["message"]
    r = http.post(f"{url}/completions", json={"model": "tiny", "prompt": [1] * 4096})
    assert "maximum context length is 4096" in r.json()["error"]["message"]
    with (
        openai.OpenAI(base_url=url, api_key="none", max_retries=0) as c,
        pytest.raises(openai.BadRequestError),
    ):
        c.completions.create(model="tiny", prompt="x", top_p=3)


def _wait_idle(server: ServerProcess, timeout_s: float = 10.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if (
            server.metric("tessera:num_requests_running") == 0
            and server.metric("tessera:num_requests_waiting") == 0
            and server.metric("tessera:kv_cache_usage_perc") == 0
        ):
            return
        time.sleep(0.05)
    raise AssertionError("the engine did not become idle")


def test_disconnect_aborts_and_frees_kv(server):
    _wait_idle(server)
    tokens_before = server.metric("tessera:generation_tokens_total")
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 4000, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with http.stream("POST", f"{server.base_url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                break
        assert server.metric("tessera:kv_cache_usage_perc") > 0
    # The connection is closed: the request is aborted and its blocks freed.
    _wait_idle(server)
    assert server.metric("tessera:generation_tokens_total") - tokens_before < 4000


def test_non_stream_disconnect_aborts(server):
    _wait_idle(server)
    tokens_before = server.metric("tessera:generation_tokens_total")
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=0.3)
    _wait_idle(server)
    assert server.metric("tessera:generation_tokens_total") - tokens_before < 4000


def test_metrics(server, client):
    client.completions.create(model="tiny", prompt="metrics please", max_tokens=3)
    text = http.get(f"{server.base_url}/metrics").text
    for name in [
        "tessera:num_requests_running", "tessera:num_requests_waiting",
        "tessera:kv_cache_usage_perc", "tessera:prompt_tokens_total",
        "tessera:generation_tokens_total", "tessera:time_to_first_token_seconds_bucket",
        "tessera:time_per_output_token_seconds_bucket", "tessera:e2e_request_latency_seconds_count",
        "tessera:prefix_cache_queries_total", "tessera:prefix_cache_hits_total",
    ]:  # fmt: skip
        assert f"{name}{{" in text, name
    assert server.metric("tessera:prompt_tokens_total") > 0
    assert server.metric("tessera:e2e_request_latency_seconds_count") >= 1
    assert http.get(f"{server.base_url}/health").json() == {"status": "ok"}


def test_stream_raw_sse_format(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
            "stream": True}  # fmt: skip
    with http.stream("POST", f"{server.base_url}/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
