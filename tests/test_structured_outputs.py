"""Structured outputs in the engine: every completion follows its grammar, whatever the model.

A random-weight model samples nearly uniformly among the tokens a grammar allows, so these
tests show the mask, not the model, is what makes the output valid. Strings in the generated
schemas are bounded (``maxLength``, enums, formats): an unbounded string is valid JSON too, but
a random model would fill it until ``max_tokens``.
"""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera import LLM, SamplingParams
from tessera.engine.llm_engine import LLMEngine
from tessera.structured.grammar import GrammarError
from tessera.structured.spec import StructuredOutputs
from tests.models import build_model

FORMATS = jsonschema.FormatChecker()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path, _ = build_model("llama", tmp_path_factory.mktemp("structured-model"))
    return LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=16 << 20)


def _leaf() -> st.SearchStrategy[dict]:
    return st.one_of(
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.integers(-50, 50).map(lambda lo: {"type": "integer", "minimum": lo,
                                             "maximum": lo + 100}),
        st.integers(1, 8).map(lambda n: {"type": "string", "maxLength": n}),
        st.integers(2, 6).map(lambda n: {"type": "string", "minLength": 1, "maxLength": n,
                                         "pattern": "^[a-z]+$"}),
        st.lists(st.text("abcxyz", min_size=1, max_size=5), min_size=1, max_size=4,
                 unique=True).map(lambda xs: {"enum": xs}),
        st.sampled_from(["date", "uuid", "ipv4"]).map(lambda f: {"type": "string",
                                                                 "format": f}),
        st.just({"type": "number", "minimum": 0, "maximum": 10}),
    )


def _schema(depth: int = 2) -> st.SearchStrategy[dict]:
    node = _leaf() if depth == 0 else st.one_of(_leaf(), _schema(depth - 1))
    objects = st.dictionaries(st.text("abcdefgh", min_size=1, max_size=4), node,
                              min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {"type": "object", "properties": props, "required": required,
                              "additionalProperties": False}))
    arrays = st.tuples(node, st.integers(0, 3)).map(
        lambda t: {"type": "array", "items": t[0], "maxItems": t[1]})
    unions = st.lists(_leaf(), min_size=2, max_size=3).map(lambda xs: {"anyOf": xs})
    return st.one_of(objects, arrays, unions)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schemas=st.lists(_schema(), min_size=4, max_size=8), seed=st.integers(0, 2**31))
def test_random_model_output_validates_for_many_schemas(llm, schemas, seed):
    params = [
        SamplingParams(temperature=1.0, seed=seed + i, max_tokens=600,
                       structured=StructuredOutputs.json_schema(s))
        for i, s in enumerate(schemas)
    ]
    outs = llm.generate(["Answer in JSON:"] * len(schemas), params, use_tqdm=False)
    for schema, out in zip(schemas, outs, strict=True):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema, format_checker=FORMATS)


def test_constrained_rows_leave_their_batch_mates_alone(llm):
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["one", "two"], plain, use_tqdm=False)
    constrained = SamplingParams(temperature=0, max_tokens=40,
                                 structured=StructuredOutputs(regex="[0-9]{4}"))
    mixed = llm.generate(["one", "x", "two"], [plain, constrained, plain], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in (mixed[0], mixed[2])] == \
        [o.outputs[0].token_ids for o in alone]
    assert mixed[1].outputs[0].text.isdigit() and len(mixed[1].outputs[0].text) == 4


def test_each_of_n_completions_follows_the_grammar(llm):
    params = SamplingParams(n=6, temperature=1.0, seed=5, max_tokens=20,
                            structured=StructuredOutputs(choice=("red", "green", "blue")))
    (out,) = llm.generate(["colour:"], params, use_tqdm=False)
    texts = [c.text for c in out.outputs]
    assert set(texts) <= {"red", "green", "blue"} and len(set(texts)) > 1


def test_preempted_constrained_sequences_stay_valid(tmp_path):
    """A KV pool too small for the batch preempts sequences mid-grammar; their grammar state
    survives the recompute."""
    path, _ = build_model("llama", tmp_path / "m")
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
              "minItems": 20, "maxItems": 20}
    params = SamplingParams(temperature=0, max_tokens=200,
                            structured=StructuredOutputs.json_schema(schema))
    roomy = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    expected = roomy.generate(["a", "b", "c", "d"], params, use_tqdm=False)
    block_bytes = roomy.engine.runner.kv_bytes_per_block(roomy.engine.model, 16)
    tight = LLM(str(path), dtype="float32", device="cpu", block_size=16,
                kv_cache_memory=block_bytes * 14)
    got = tight.generate(["a", "b", "c", "d"], params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    for g, e in zip(got, expected, strict=True):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        jsonschema.validate(json.loads(g.outputs[0].text), schema)


def _engine(llm: LLM) -> LLMEngine:
    engine = llm.engine
    assert isinstance(engine, LLMEngine)
    return engine


def test_requests_wait_for_their_grammar_and_can_be_aborted(llm, monkeypatch):
    engine = _engine(llm)
    assert engine.grammars is not None
    release = threading.Event()
    compile_once = engine.grammars._compile

    def slow_compile(spec):
        assert release.wait(30)
        compile_once(spec)

    monkeypatch.setattr(engine.grammars, "_compile", slow_compile)
    spec = StructuredOutputs(regex="slow-[ab]{3}")
    params = SamplingParams(temperature=0, max_tokens=30, structured=spec)
    engine.add_request("waits", [1, 2, 3], params)
    engine.add_request("aborted", [1, 2, 3], params)
    engine.add_request("plain", [4, 5], SamplingParams(temperature=0, max_tokens=3,
                                                       ignore_eos=True))
    assert engine.stats().num_waiting >= 2
    finished = []
    # The plain request runs while the grammar compiles.
    while not any(o.request_id == "plain" for o in finished):
        finished += engine.step()
    assert engine.has_unfinished_requests()
    assert engine.abort_request("aborted")
    release.set()
    while engine.has_unfinished_requests():
        finished += engine.step()
    by_id = {o.request_id: o for o in finished}
    assert set(by_id) == {"plain", "waits"}
    assert by_id["waits"].outputs[0].text.startswith("slow-")
    assert engine.block_manager.num_free_blocks == engine.runtime.num_kv_blocks


def test_a_grammar_that_fails_to_compile_ends_only_its_request(llm, monkeypatch):
    engine = _engine(llm)
    assert engine.grammars is not None

    def failing(spec):
        raise GrammarError("regex", "the tokenizer cannot express it")

    monkeypatch.setattr(engine.grammars, "_compile", failing)
    engine.add_request("bad", [1, 2], SamplingParams(
        max_tokens=4, structured=StructuredOutputs(regex="never-[0-9]")))
    engine.add_request("ok", [1, 2], SamplingParams(temperature=0, max_tokens=2,
                                                    ignore_eos=True))
    finished = []
    while engine.has_unfinished_requests():
        finished += engine.step()
    by_id = {o.request_id: o for o in finished}
    assert by_id["bad"].outputs[0].finish_reason == "error"
    assert "cannot express" in by_id["bad"].outputs[0].error
    assert by_id["ok"].outputs[0].finish_reason == "length"


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({}, "exactly one"),
    ({"regex": "a", "choice": ["b"]}, "exactly one"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": "[1, 2]"}, "must be an object"),
    ({"choice": []}, "choice"),
    ({"regex": ""}, "non-empty"),
    ({"grammar": "x" * (300 * 1024)}, "at most"),
])
def test_bad_specs_are_refused_at_construction(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        StructuredOutputs(**kwargs)


def test_bad_grammar_and_logit_bias_are_refused_at_add(llm):
    engine = _engine(llm)
    with pytest.raises(GrammarError, match="invalid regex"):
        engine.add_request("r1", [1], SamplingParams(structured=StructuredOutputs(regex="(")))
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("r2", [1], SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101.0})
    assert not engine.has_unfinished_requests()


def test_a_tokenizer_llguidance_cannot_read_whole_still_constrains_exactly():
    """The demo model's character-level tokenizer (with a normalizer that pads numbers with
    zeros) is described to llguidance piece by piece; its masks must match what is
    generated, so every output follows the grammar."""
    import re

    from tessera.demo_model import model_dir

    llm = LLM(str(model_dir()), dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    regex = r'\{"a": [0-9]{1,3}, "b": [0-9]{1,3}\}'
    schema = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 999},
                                               "b": {"type": "integer", "maximum": 999}},
              "required": ["a", "b"], "additionalProperties": False}
    questions = ["What is 347+58?", "12+30", "999+1", "What is 5+17?"]
    for structured in (StructuredOutputs(regex=regex), StructuredOutputs.json_schema(schema)):
        outs = llm.generate(questions, SamplingParams(temperature=0, max_tokens=48,
                                                      structured=structured), use_tqdm=False)
        for out in outs:
            text = out.outputs[0].text
            assert out.outputs[0].finish_reason == "stop"
            if structured.regex:
                assert re.fullmatch(regex, text), text
            else:
                jsonschema.validate(json.loads(text), schema)
