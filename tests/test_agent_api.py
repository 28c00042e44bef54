"""What agent frameworks need from the server: structured outputs, tool calls and reasoning,
driven by the official ``openai`` SDK.

One server (a tiny random Llama with a chat template that renders tools in the Hermes
format, and ``--reasoning-parser qwen3``) serves the module. A random model would never write
a call or a ``<think>`` block by itself, so the tests that need one constrain its output to
one (``structured_outputs``) and check what the server makes of it.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tessera.demo import ADD_TOOL
from tests.test_serve_util import ServerProcess, build_server_model

pytestmark = pytest.mark.processes

TOOL_TEMPLATE = (
    "{% if tools %}<|system|>Tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}{% elif m.role == 'tool' %}[{{ m.tool_call_id }}] {{ m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

ADD = ADD_TOOL  # the demo's add(a: int, b: int)
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = build_server_model(tmp_path_factory.mktemp("agent-model"))
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TOOL_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess(model_dir, "--reasoning-parser", "qwen3")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0) as c:
        yield c


def _validate_call(call, tools) -> dict:
    """The call's arguments, checked against its tool's schema."""
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] ==
                  call.function.name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, schema)
    return args


# ----------------------------------------------------------------- structured outputs
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_response_format_json_schema_validates(client, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format=fmt, max_tokens=300, seed=seed,
        temperature=1.0)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)

    chunks = list(client.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format=fmt, max_tokens=300, seed=seed,
        temperature=1.0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # the same seed: the same output, streamed


def test_json_object_and_completions_endpoint(client):
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format={"type": "json_object"},
        max_tokens=400, temperature=0)
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    done = client.completions.create(
        model="tiny", prompt="Person:", max_tokens=300, temperature=0,
        extra_body={"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "p", "schema": PERSON}}})
    jsonschema.validate(json.loads(done.choices[0].text), PERSON)


def test_structured_outputs_choice_regex_and_grammar(client):
    def complete(**so) -> str:
        out = client.completions.create(model="tiny", prompt="Answer:", max_tokens=40,
                                        temperature=1.0, seed=3,
                                        extra_body={"structured_outputs": so})
        return out.choices[0].text

    assert complete(choice=["yes", "no"]) in ("yes", "no")
    import re
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", complete(regex=r"[0-9]{3}-[a-z]{2}"))
    assert complete(grammar='root ::= "up" | "down"') in ("up", "down")  # GBNF
    assert complete(grammar='start: "left" | "right"') in ("left", "right")  # Lark


@pytest.mark.parametrize(("body", "needle"), [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"not": {"type": "string"}}}}}, "not"),
    ({"structured_outputs": {"regex": "[a-"}}, "regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ({"structured_outputs": {"grammar": "start: nothing"}}, "nothing"),
    ({"logit_bias": {"99999": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
])
def test_bad_constraints_get_400(server, body, needle):
    r = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": MESSAGES, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"]
    assert error["type"] == "BadRequestError"


def test_logit_bias_steers_greedy_output(client, model_dir):
    from transformers import AutoTokenizer

    (z,) = AutoTokenizer.from_pretrained(model_dir).encode("Z", add_special_tokens=False)
    out = client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=0,
                                    logit_bias={str(z): 100},
                                    extra_body={"return_token_ids": True})
    assert out.choices[0].text == "ZZZZZ"
    assert out.choices[0].model_extra["token_ids"] == [z] * 5


# ----------------------------------------------------------------- tool calls
def test_tool_choice_required_yields_valid_calls(client):
    tools = [ADD, WEATHER]
    for seed in range(3):
        out = client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=tools, tool_choice="required",
            max_tokens=300, temperature=1.0, seed=seed, parallel_tool_calls=False)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        _validate_call(call, tools)


def test_named_tool_choice_streams_arguments(client):
    tools = [ADD, WEATHER]
    chunks = list(client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=tools, max_tokens=300, temperature=0,
        tool_choice={"type": "function", "function": {"name": "weather"}}, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    header = calls[0]
    assert header.index == 0 and header.id.startswith("call_")
    assert header.function.name == "weather" and header.function.arguments == ""
    assert all(tc.id is None and tc.function.name is None for tc in calls[1:])
    arguments = "".join(tc.function.arguments for tc in calls)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    whole = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=tools, max_tokens=300, temperature=0,
        tool_choice={"type": "function", "function": {"name": "weather"}})
    (call,) = whole.choices[0].message.tool_calls
    assert call.function.name == "weather" and call.function.arguments == arguments


def test_tool_round_trip_renders_history(client, model_dir):
    from transformers import AutoTokenizer

    first = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=[ADD], tool_choice="required", max_tokens=200,
        temperature=0)
    call = first.choices[0].message.tool_calls[0]
    args = _validate_call(call, [ADD])
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": str(args["a"] + args["b"])},
    ]
    final = client.chat.completions.create(
        model="tiny", messages=history, tools=[ADD], tool_choice="none", max_tokens=8,
        temperature=0)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content is not None
    # The server rendered the call and its result into the prompt, as the template says.
    tok = AutoTokenizer.from_pretrained(model_dir)
    expected = tok.apply_chat_template(
        [*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "add", "arguments": args}}]}, history[2]],
        tools=[ADD], tokenize=False, add_generation_prompt=True)
    assert '<tool_call>{"name": "add"' in expected and f"[{call.id}]" in expected
    assert final.usage.prompt_tokens == len(tok.encode(expected, add_special_tokens=False))


HERMES_CALL = r'Sure\. <tool_call>\{"name": "add", "arguments": \{"a": [1-9], "b": [1-9]\}\}</tool_call>'


def test_auto_tool_choice_parses_the_model_format(client):
    """The template shows Hermes calls, so ``auto`` parses them (the random model is made to
    write one by a regex)."""
    kwargs = dict(model="tiny", messages=MESSAGES, tools=[ADD], tool_choice="auto",
                  max_tokens=200, temperature=0, extra_body={"structured_outputs":
                                                             {"regex": HERMES_CALL}})
    out = client.chat.completions.create(**kwargs)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content.strip() == "Sure."
    (call,) = choice.message.tool_calls
    assert call.function.name == "add"
    args = _validate_call(call, [ADD])

    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert content.strip() == "Sure."
    assert calls[0].function.name == "add"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == args
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_bad_tool_requests_get_400(server):
    def post(**body) -> httpx.Response:
        return httpx.post(f"{server.base_url}/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": MESSAGES, "max_tokens": 4, **body})

    r = post(tool_choice={"type": "function", "function": {"name": "nope"}}, tools=[ADD])
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
    r = post(tool_choice="required")
    assert r.status_code == 400 and "tools" in r.json()["error"]["message"]
    r = post(tools=[ADD, ADD])
    assert r.status_code == 400 and "unique" in r.json()["error"]["message"]
    r = post(tools=[{"type": "function", "function": {"name": "bad name!"}}])
    assert r.status_code == 400
    r = post(tools=[ADD], tool_choice="required", response_format={"type": "json_object"})
    assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]
    bad_history = [*MESSAGES, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{oops"}}]}]
    r = post(messages=bad_history)
    assert r.status_code == 400 and "arguments" in r.json()["error"]["message"]


# ----------------------------------------------------------------- reasoning
THINKING = r"<think>[a-z]{3,12}</think>[a-z]{2,8}"


def test_reasoning_split_streamed_and_not(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=60, temperature=0,
                  extra_body={"structured_outputs": {"regex": THINKING}})
    out = client.chat.completions.create(**kwargs)
    message = out.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and reasoning.isalpha() and message.content.isalpha()
    # One token per byte, and the end-of-sequence token: max_tokens counts both parts.
    assert out.usage.completion_tokens == len(f"<think>{reasoning}</think>{message.content}") + 1

    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == \
        reasoning
    assert "".join(d.content or "" for d in deltas) == message.content
    # Reasoning first, then the answer: no content delta before the last reasoning one.
    kinds = ["r" if (d.model_extra or {}).get("reasoning_content") else "c" for d in deltas
             if d.content or (d.model_extra or {}).get("reasoning_content")]
    assert kinds == sorted(kinds, reverse=True)


def test_max_tokens_counts_reasoning(client):
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
        extra_body={"structured_outputs": {"regex": THINKING}})
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content is None or choice.message.content == ""
    assert choice.message.model_extra["reasoning_content"]


# ----------------------------------------------------------------- an agent framework
def test_openai_agents_sdk_runs_a_two_tool_task(server):
    """The OpenAI Agents SDK, unchanged, against the server: the first turn must call a tool
    (``tool_choice="required"``: a grammar makes the random model comply), the SDK runs it
    and sends the result back, and the next turn (``auto``, the SDK's reset) answers."""
    import asyncio

    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    calls: list[tuple[str, dict]] = []

    @function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append(("add", {"a": a, "b": b}))
        return a + b

    @function_tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        calls.append(("multiply", {"a": a, "b": b}))
        return a * b

    async def run(stream: bool) -> str:
        client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
        agent = Agent(
            name="calculator", instructions="Use the tools.", tools=[add, multiply],
            model=OpenAIChatCompletionsModel(model="tiny", openai_client=client),
            # Sampled, not greedy: a random model's greedy choice may extend a number forever.
            model_settings=ModelSettings(tool_choice="required", max_tokens=200,
                                         temperature=1.0, extra_body={"seed": 7}),
        )
        if stream:
            result = Runner.run_streamed(agent, "What is 2 + 3, times 4?", max_turns=4)
            async for _ in result.stream_events():
                pass
        else:
            result = await Runner.run(agent, "What is 2 + 3, times 4?", max_turns=4)
        await client.close()
        return str(result.final_output)

    for stream in (False, True):
        calls.clear()
        final = asyncio.run(run(stream))
        assert calls, "the agent must have run a tool"
        for name, args in calls:
            assert name in ("add", "multiply")
            assert all(isinstance(v, int) for v in args.values())
        assert isinstance(final, str)
