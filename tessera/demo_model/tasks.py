"""The demo model's synthetic chat tasks: addition, copying, reversing and calling an ``add``
tool (pure Python).

Training (``tessera.demo_model.train``), the demo and the tests draw questions from here, so
the held-out rule is defined once: an addition pair is held out when a fixed hash of it falls in
one residue class, and training never sees those pairs.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

MAX_OPERAND_DIGITS = 3
MIN_WORD_CHARS, MAX_WORD_CHARS = 2, 8
_HELD_OUT_MODULUS = 50


@dataclass(frozen=True)
class Example:
    """One chat turn: the user's question and the assistant's checkable answer."""

    question: str
    answer: str  # the full reply the model is trained to give
    result: str  # the part of a reply that is checked (see ``is_correct``)
    tools: tuple[str, ...] = ()  # the names of the tools the chat offers


def final_number(reply: str) -> str | None:
    """The number after the last ``=`` at the end of a reply (``... so 347+58=405.`` -> ``405``),
    or the whole reply when it is a bare number (what models trained on plain answers say)."""
    match = re.search(r"(?:^|=)([0-9]+)\.?\s*$", reply)
    return match.group(1) if match else None


def is_correct(example: Example, reply: str) -> bool:
    """The one answer check: an addition's final sum, or a copy/reversal's exact text."""
    if example.question.startswith("What is") and not example.tools:
        return final_number(reply) == example.result
    return reply == example.result


def is_held_out(a: int, b: int) -> bool:
    """Whether the addition ``a + b`` is reserved for evaluation (about 2% of pairs)."""
    return (a * 7919 + b * 104729 + 17) % _HELD_OUT_MODULUS == 0


def _operand(rng: random.Random) -> int:
    # Digit counts are drawn uniformly so 3-digit sums with carries are common, not rare.
    num_digits = rng.randint(1, MAX_OPERAND_DIGITS)
    low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
    return rng.randint(low, 10**num_digits - 1)


def worked_sum(a: int, b: int) -> str:
    """``7+8=15, 4+5+1=10, 3+0+1=4, so 347+58=405.``: column by column, units first.

    Each clause adds one column's digits and the carry (written only when it is 1), so every
    step needs just two digits of the question and the previous clause; there are always
    ``MAX_OPERAND_DIGITS`` clauses (the model reads operands zero-padded to that width)."""
    steps = []
    carry = 0
    for col in range(MAX_OPERAND_DIGITS):
        da, db = a // 10**col % 10, b // 10**col % 10
        total = da + db + carry
        steps.append(f"{da}+{db}" + ("+1" if carry else "") + f"={total}")
        carry = total // 10
    return ", ".join(steps) + f", so {a}+{b}={a + b}."


def addition(a: int, b: int, spaced: bool = False) -> Example:
    """``What is 347+58?`` (or ``What is 347 + 58?`` when ``spaced``) -> a worked sum ending
    ``so 347+58=405.``; the checked result is ``405``."""
    op = " + " if spaced else "+"
    return Example(f"What is {a}{op}{b}?", worked_sum(a, b), str(a + b))


def tool_call(a: int, b: int) -> Example:
    """``What is 347+58?`` with an ``add`` tool offered -> the tool's arguments,
    ``{"a": 347, "b": 58}`` (the JSON a grammar for the tool's schema admits)."""
    arguments = f'{{"a": {a}, "b": {b}}}'
    return Example(f"What is {a}+{b}?", arguments, arguments, tools=("add",))


def addition_pair(rng: random.Random, held_out: bool) -> tuple[int, int]:
    """A random operand pair from the training pairs or from the held-out pairs."""
    while True:
        a, b = _operand(rng), _operand(rng)
        if is_held_out(a, b) == held_out:
            return a, b


def word(rng: random.Random) -> str:
    """A random lowercase string for the copy and reverse tasks."""
    n = rng.randint(MIN_WORD_CHARS, MAX_WORD_CHARS)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def copy(text: str) -> Example:
    return Example(f"Copy: {text}", text, text)


def reverse(text: str) -> Example:
    return Example(f"Reverse: {text}", text[::-1], text[::-1])


def training_example(rng: random.Random) -> Example:
    """One training example: addition most of the time (the hardest task), else copy/reverse."""
    r = rng.random()
    if r < 0.5:
        a, b = addition_pair(rng, held_out=False)
        return addition(a, b, spaced=rng.random() < 0.25)
    if r < 0.62:
        return tool_call(*addition_pair(rng, held_out=False))
    if r < 0.81:
        return copy(word(rng))
    return reverse(word(rng))


def held_out_pairs(num: int, seed: int = 1234) -> list[tuple[int, int]]:
    """``num`` distinct held-out operand pairs (deterministic for a seed)."""
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int]] = []
    while len(out) < num:
        pair = addition_pair(rng, held_out=True)
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def held_out_additions(num: int, seed: int = 1234) -> list[Example]:
    """``num`` distinct held-out addition questions (deterministic for a seed)."""
    return [addition(*pair) for pair in held_out_pairs(num, seed)]
