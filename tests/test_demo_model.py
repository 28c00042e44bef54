"""The bundled demo model, served by Tessera and asked through the official ``openai`` client.

Held-out additions (pairs the training never saw) must be >= 95% correct; copying, reversing
and calling the ``add`` tool (through the server's tool calling) are checked too. Also: the bundled chat template renders exactly what training saw,
and ``python -m tessera.demo`` runs end to end and exits 0.
"""

from __future__ import annotations

import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tessera.demo_model import SERVED_NAME, model_dir
from tessera.demo_model.tasks import (
    Example,
    addition,
    copy,
    held_out_additions,
    held_out_pairs,
    is_correct,
    is_held_out,
    reverse,
    tool_call,
    word,
)
from tests.test_serve_util import SERVER_ENV, ServerProcess, free_port

NUM_ADDITIONS = 160


@pytest.fixture(scope="module")
def client():
    srv = ServerProcess(model_dir(), name=SERVED_NAME)
    try:
        srv.wait_ready()
        with openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="none", max_retries=0,
                           timeout=120.0) as c:  # fmt: skip
            yield c
    finally:
        srv.stop()


def _answers(client: openai.OpenAI, questions: list[Example]) -> list[str]:
    """Greedy chat answers, sent 32 at a time so the server batches them."""

    def ask(q: Example) -> str:
        out = client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": q.question}],
            max_tokens=48, temperature=0,
        )  # fmt: skip
        return out.choices[0].message.content or ""

    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(ask, questions))


@pytest.mark.processes
@pytest.mark.slow
def test_held_out_additions_at_least_95_percent(client):
    questions = held_out_additions(NUM_ADDITIONS)
    assert all(is_held_out(*map(int, q.question[8:-1].split("+"))) for q in questions)
    answers = _answers(client, questions)
    pairs = zip(questions, answers, strict=True)
    wrong = [(q.question, a) for q, a in pairs if not is_correct(q, a)]
    assert len(wrong) <= 0.05 * NUM_ADDITIONS, wrong


def test_worked_sums_add_up_and_the_check_reads_the_final_sum():
    ex = addition(347, 58)
    assert ex.answer == "7+8=15, 4+5+1=10, 3+0+1=4, so 347+58=405."
    assert is_correct(ex, ex.answer) and is_correct(ex, "so 347+58=405")
    assert not is_correct(ex, "7+8=15, 4+5+1=10, 3+0+1=4, so 347+58=404.")
    assert is_correct(ex, "405") and not is_correct(ex, "1405")
    assert not is_correct(ex, "405 is 347+58")  # the sum must come last, after "="
    rng = random.Random(5)
    for _ in range(200):
        a, b = rng.randrange(1000), rng.randrange(1000)
        clauses = addition(a, b).answer.removesuffix(".").split(", ")
        # Each column clause is true arithmetic, and the final clause states a + b.
        for clause in clauses[:-1]:
            terms, total = clause.split("=")
            assert sum(map(int, terms.split("+"))) == int(total)
        assert clauses[-1] == f"so {a}+{b}={a + b}"
    assert is_correct(copy("abc"), "abc") and not is_correct(reverse("abc"), "abc")


@pytest.mark.processes
@pytest.mark.slow
def test_copy_and_reverse(client):
    rng = random.Random(99)
    questions = [task(word(rng)) for task in (copy, reverse) for _ in range(10)]
    answers = _answers(client, questions)
    pairs = zip(questions, answers, strict=True)
    wrong = [(q.question, a) for q, a in pairs if not is_correct(q, a)]
    assert len(wrong) <= 1, wrong


@pytest.mark.processes
@pytest.mark.slow
def test_tool_calls_carry_the_question_operands(client):
    """A sum asked with the ``add`` tool offered (``tool_choice`` names it, so a grammar holds
    the reply to the tool's schema) comes back as a call with the question's operands."""
    from tessera.demo import ADD_TOOL, valid_add_arguments

    pairs = held_out_pairs(40, seed=77)

    def call(pair: tuple[int, int]) -> str:
        out = client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": f"What is {pair[0]}+"
                                          f"{pair[1]}?"}],
            tools=[ADD_TOOL], tool_choice={"type": "function", "function": {"name": "add"}},
            max_tokens=48, temperature=0)
        assert out.choices[0].finish_reason == "tool_calls"
        (tc,) = out.choices[0].message.tool_calls
        assert tc.function.name == "add" and valid_add_arguments(tc.function.arguments)
        return tc.function.arguments

    with ThreadPoolExecutor(8) as pool:
        arguments = list(pool.map(call, pairs))
    wrong = [(p, a) for p, a in zip(pairs, arguments, strict=True)
             if not is_correct(tool_call(*p), a)]
    assert len(wrong) <= 2, wrong


def test_chat_template_renders_the_training_format():
    from transformers import AutoTokenizer

    from tessera.demo_model.train import encode, render, vocabulary

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    ex = reverse("abc")
    prompt, answer = render(ex)
    text = tok.apply_chat_template(
        [{"role": "user", "content": ex.question}], tokenize=False, add_generation_prompt=True
    )
    assert text == prompt
    ids = tok.encode(prompt + answer, add_special_tokens=False)
    assert ids == encode(prompt + answer, vocabulary())
    assert tok.decode(ids, skip_special_tokens=True) == ex.question + ex.answer
    # Numbers reach the model zero-padded to three digits, exactly as in training.
    prompt = render(addition(7, 45))[0]
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids == encode(prompt, vocabulary())
    assert tok.decode(ids, skip_special_tokens=True) == "What is 007+045?"
    # Offered tools are listed by name in a system turn.
    tools = [{"type": "function", "function": {"name": "add"}}]
    text = tok.apply_chat_template([{"role": "user", "content": "What is 7+45?"}], tools=tools,
                                   tokenize=False, add_generation_prompt=True)
    assert text == render(tool_call(7, 45))[0]


@pytest.mark.processes
@pytest.mark.slow
def test_demo_runs_and_exits_cleanly():
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.demo", "--num-burst", "8", "--threads", "1",
         "--port", str(free_port())],
        env=SERVER_ENV, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "user:      What is 347+58?" in proc.stdout
    assert 'tool call: add({"a": 347, "b": 58})' in proc.stdout
    assert "output tokens/s" in proc.stdout and "TTFT p50" in proc.stdout
    assert "server stopped (exit code 0)" in proc.stdout


def test_generate_chat_on_the_demo_model(capsys):
    from tessera.cli import main

    rc = main(["generate", str(model_dir()), "--chat", "--prompt", "Copy: serving",
               "--max-tokens", "8", "--dtype", "float32", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out.strip() == "serving"


def test_generate_chat_needs_a_chat_template(model_factory, capsys):
    from tessera.cli import main

    path, _ = model_factory("llama")  # byte tokenizer, no chat template
    rc = main(["generate", str(path), "--chat", "--prompt", "hi", "--device", "cpu"])
    assert rc == 2
    assert "--chat needs a tokenizer with a chat_template" in capsys.readouterr().err
