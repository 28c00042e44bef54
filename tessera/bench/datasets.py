"""Request sets for ``tessera bench serve``: random, ShareGPT-style, and shared prefixes.

Prompts are token-id lists where the length matters (random, prefix), so lengths are exact
whatever the server's tokenizer; ShareGPT prompts are text and their lengths come back in the
server's ``usage``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]
    num_output_tokens: int


def _lengths(rng: random.Random, mean: int, range_ratio: float, count: int) -> list[int]:
    lo = max(1, int(mean * (1 - range_ratio)))
    hi = max(lo, int(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(count)]


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int,
) -> list[BenchRequest]:
    """Prompts of random token ids; lengths uniform in ``len * [1 - ratio, 1 + ratio]``."""
    rng = random.Random(seed)
    ins = _lengths(rng, input_len, range_ratio, num_prompts)
    outs = _lengths(rng, output_len, range_ratio, num_prompts)
    return [
        BenchRequest([rng.randrange(vocab_size) for _ in range(n_in)], n_out)
        for n_in, n_out in zip(ins, outs, strict=True)
    ]


def prefix_requests(
    num_prompts: int,
    prefix_len: int,
    num_prefixes: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    seed: int,
) -> list[BenchRequest]:
    """``num_prefixes`` shared system prompts of ``prefix_len`` tokens, each followed by a
    random ``input_len``-token question (exercises prefix caching)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(vocab_size) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    return [
        BenchRequest(
            prefixes[i % num_prefixes] + [rng.randrange(vocab_size) for _ in range(input_len)],
            output_len,
        )
        for i in range(num_prompts)
    ]


def sharegpt_requests(
    path: str, num_prompts: int, output_len: int | None, seed: int
) -> list[BenchRequest]:
    """First human turn of each ShareGPT conversation; the reply's length (about 4/3 tokens
    per word) sets ``max_tokens`` unless ``output_len`` is given."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    pairs = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, reply = turns[0].get("value"), turns[1].get("value")
        if isinstance(prompt, str) and isinstance(reply, str) and prompt:
            n_out = output_len or max(1, round(len(reply.split()) * 4 / 3))
            pairs.append(BenchRequest(prompt, n_out))
    if not pairs:
        raise ValueError(f"{path}: no conversation with a prompt and a reply")
    random.Random(seed).shuffle(pairs)
    # Cycle when the file holds fewer conversations than requested prompts.
    return [pairs[i % len(pairs)] for i in range(num_prompts)]


def as_text_prompts(requests: list[BenchRequest], tokenizer_dir: str) -> list[BenchRequest]:
    """The same requests with token-id prompts turned into text, for servers that take only
    text (llama-cpp-python's). Each id picks one of the tokenizer's whole-word pieces (those
    starting with a word boundary marker), so the text tokenizes back to about as many tokens;
    exact counts come back in the server's ``usage`` where it sends one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    # "▁" marks a word start in SentencePiece-style vocabularies, "Ġ" in byte-level BPE ones.
    words = [
        i for i, p in enumerate(pieces)
        if isinstance(p, str) and p[:1] in ("▁", "Ġ") and p[1:].isalpha() and p[1:].isascii()
    ]  # fmt: skip
    if not words:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has no whole-word pieces")
    out = []
    for req in requests:
        if isinstance(req.prompt, str):
            out.append(req)
            continue
        ids = [words[t % len(words)] for t in req.prompt]
        out.append(BenchRequest(str(tok.decode(ids)).strip(), req.num_output_tokens))
    return out
