"""Property-based fuzz of both OpenAI endpoints against a running server (the demo model).

Bodies are drawn from the request models' own fields (``CompletionRequest``,
``ChatCompletionRequest``): each field is left out or given a value of its declared type (with
the edges of 64-bit integers and non-finite floats among them), and in half of the bodies one
field gets any JSON value at all; whole bodies of arbitrary JSON are sent too. The property: never a 5xx, never an error
event with a 5xx code inside a stream, every stream ends with ``[DONE]``, every error has
OpenAI's shape, and the server is healthy, serving and holding no KV blocks at the end.
"""

from __future__ import annotations

import json
import time
import types
import typing
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tessera.demo_model import SERVED_NAME, model_dir
from tessera.serve.openai_models import ChatCompletionRequest, CompletionRequest
from tests.test_serve_util import ServerProcess, http

pytestmark = [pytest.mark.processes, pytest.mark.slow]

NUM_EXAMPLES = 120

EDGE_INTS = [0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip


def typed(annotation: Any) -> st.SearchStrategy[Any]:
    """Values of a pydantic field's declared type, hostile edges included."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        return st.one_of([typed(a) for a in args])
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(typed(args[0]), max_size=5)
    if origin is dict:
        return st.dictionaries(st.text(max_size=12), json_values, max_size=3)
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(-3, 40) | st.sampled_from(EDGE_INTS)
    if annotation is float:
        return st.floats(-3, 3) | st.floats()  # NaN and infinities are sent as JSON literals
    if annotation is str:
        return st.text(max_size=24)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return bodies(annotation, hostile=False)
    return json_values


LIKELY = {
    # Mostly this server's model and a real conversation, so many bodies get past routing.
    "model": st.just(SERVED_NAME) | st.none() | st.text(max_size=8),
    "role": st.sampled_from(["user", "assistant", "system"]) | st.text(max_size=8),
    "messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                               "content": st.text(max_size=24)}), min_size=1, max_size=4,
    ),
}  # fmt: skip


def bodies(model: type[BaseModel], hostile: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    """Request bodies for ``model``: each field left out or typed; with ``hostile``, half of
    the bodies then have one field (present or not) replaced by any JSON value."""
    fields = {
        name: st.one_of(LIKELY[name], typed(info.annotation)) if name in LIKELY
        else typed(info.annotation)
        for name, info in model.model_fields.items()
    }
    required = {n: s for n, s in fields.items() if model.model_fields[n].is_required()}
    optional = {n: s for n, s in fields.items() if n not in required}
    typed_bodies = st.fixed_dictionaries(required, optional=optional)
    if not hostile:
        return typed_bodies

    @st.composite
    def one_field_garbled(draw: st.DrawFn) -> dict[str, Any]:
        body = draw(typed_bodies)
        body[draw(st.sampled_from(sorted(fields)))] = draw(json_values)
        return body

    return typed_bodies | one_field_garbled()


def _affordable(body: Any) -> Any:
    """Keep a valid body cheap to serve: a few completions of a few tokens each (ranges past
    what the server admits are left as drawn, and the hostile-input table covers the rest)."""
    if isinstance(body, dict):
        for name, cap in (("n", 2), ("best_of", 2), ("max_tokens", 8),
                          ("max_completion_tokens", 8)):  # fmt: skip
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and cap < value <= 10**6:
                body[name] = cap
        body["model"] = SERVED_NAME if body.get("model") is None else body["model"]
    return body


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(model_dir(), "--max-num-seqs", "8", "--max-waiting", "24",
                        name=SERVED_NAME)  # fmt: skip
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def _check(server: ServerProcess, path: str, body: Any) -> None:
    raw = json.dumps(body).encode()  # NaN and Infinity become their (non-JSON) literals
    url = f"{server.base_url}/v1/{path}"
    headers = {"content-type": "application/json"}
    with http.stream("POST", url, content=raw, headers=headers) as r:
        text = r.read().decode()
    assert r.status_code < 500, (body, text[:500])
    if r.status_code >= 400:
        err = json.loads(text)["error"]
        # An unknown model (the only 404 of a fixed route) has OpenAI's code.
        code = "model_not_found" if r.status_code == 404 else r.status_code
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
        return
    if "text/event-stream" in r.headers.get("content-type", ""):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", text[-300:]
        for event in events[:-1]:
            err = json.loads(event).get("error")
            assert err is None or err["code"] < 500, (body, err)


@settings(max_examples=NUM_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(body=bodies(CompletionRequest).map(_affordable) | json_values)
def test_fuzz_completions(server, body):
    _check(server, "completions", body)


@settings(max_examples=NUM_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(body=bodies(ChatCompletionRequest).map(_affordable) | json_values)
def test_fuzz_chat_completions(server, body):
    _check(server, "chat/completions", body)


def test_server_is_healthy_after_the_fuzz(server):
    # Runs after the two fuzz tests (file order): nothing they sent broke or leaked anything.
    assert http.get(f"{server.base_url}/health").status_code == 200
    r = http.post(f"{server.base_url}/v1/completions",
                  json={"model": SERVED_NAME, "prompt": "What is 1+2?", "max_tokens": 4})  # fmt: skip
    assert r.status_code == 200
    deadline_s = time.monotonic() + 30
    while server.metric("tessera:kv_cache_usage_perc") != 0.0:
        assert time.monotonic() < deadline_s, "KV blocks still held after the fuzz"
        time.sleep(0.1)
    with pytest.raises(httpx.HTTPStatusError):
        http.get(f"{server.base_url}/v1/nothing").raise_for_status()
