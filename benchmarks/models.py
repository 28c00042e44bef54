"""Random-weight Hugging Face test models for the benchmarks, built offline.

Each model directory holds the usual ``config.json`` + ``model.safetensors`` (written by
``save_pretrained``) and a tokenizer that we train ourselves, so nothing is downloaded:

* ``tokenizer.json``: a Llama-2-style byte-fallback BPE (Metaspace ``▁`` pre-tokenizer,
  ``<unk>``/``<s>``/``</s>`` at ids 0/1/2, the 256 ``<0xNN>`` byte tokens at ids 3..258, then
  merges learnt from a deterministic synthetic corpus) with exactly ``vocab_size`` entries.
* ``tokenizer_config.json``: bos/eos/unk tokens; loads with ``transformers.AutoTokenizer``.

The byte-fallback BPE layout is what llama.cpp's converter accepts for Llama-family models
without a known pre-tokenizer hash (it maps it onto llama.cpp's SentencePiece tokenizer).

A directory is reused when its ``tessera_random_model.json`` stamp matches the requested build.

Usage::

    python benchmarks/models.py --out .bench/models/llama-100m
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path
from typing import Any

STAMP_FILE = "tessera_random_model.json"
STAMP_VERSION = 1

NUM_BYTE_TOKENS = 256
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# Defaults per architecture (Hugging Face ``model_type``); ``make_random_model`` overrides them.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "intermediate_size": 2048,
    },
    "mixtral": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 1024,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "qwen2_moe": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 1024,
        "moe_intermediate_size": 256,
        "shared_expert_intermediate_size": 512,
        "num_experts": 16,
        "num_experts_per_tok": 4,
    },
    "qwen3_moe": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 1024,
        "moe_intermediate_size": 256,
        "num_experts": 16,
        "num_experts_per_tok": 4,
    },
}


def _synthetic_corpus(seed: int, num_words: int = 400_000) -> list[str]:
    """Deterministic pseudo-text: a Zipf-weighted lexicon of syllable words, digits, punctuation.

    Returns lines of text; ~2.5 MB in all, enough distinct pairs for 32k+ BPE merges.
    """
    rng = random.Random(seed)
    consonants = "bcdfghjklmnprstvwyz"
    vowels = "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    syllables += [c + v + e for c in consonants for v in vowels for e in "nrst"]
    num_lexicon_words = 60_000
    lexicon = []
    for _ in range(num_lexicon_words):
        num_syllables = rng.choice((1, 1, 2, 2, 2, 3, 3, 4))
        word = "".join(rng.choice(syllables) for _ in range(num_syllables))
        if rng.random() < 0.1:
            word = word.capitalize()
        lexicon.append(word)
    weights = [1.0 / (rank + 10) for rank in range(num_lexicon_words)]
    punctuation = [".", ",", "!", "?", ";", ":", "-", "(", ")", '"', "'"]
    words = rng.choices(lexicon, weights=weights, k=num_words)
    lines: list[str] = []
    line: list[str] = []
    for word in words:
        roll = rng.random()
        if roll < 0.05:
            line.append(str(rng.randint(0, 99999)))
        elif roll < 0.15:
            line.append(word + rng.choice(punctuation))
        else:
            line.append(word)
        if len(line) >= 24:
            lines.append(" ".join(line))
            line = []
    if line:
        lines.append(" ".join(line))
    return lines


def build_tokenizer(out_dir: str, vocab_size: int, seed: int = 0) -> None:
    """Train a byte-fallback BPE with exactly ``vocab_size`` tokens and save it to ``out_dir``.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    num_reserved = len(SPECIAL_TOKENS) + NUM_BYTE_TOKENS
    if vocab_size <= num_reserved + 64:
        raise ValueError(f"vocab_size must exceed {num_reserved + 64}, got {vocab_size}")

    # 1. Learn merges on the synthetic corpus (specials only; byte tokens are inserted after).
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - NUM_BYTE_TOKENS,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    trainer_tok.train_from_iterator(_synthetic_corpus(seed), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    trained_vocab: dict[str, int] = trained["vocab"]
    merges_raw = trained["merges"]
    merges: list[tuple[str, str]] = []
    for merge in merges_raw:  # [left, right] pairs (older tokenizers: "left right" strings)
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        merges.append((left, right))

    # 2. Lay out the final vocabulary: specials, 256 byte tokens, learnt tokens in id order.
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for byte in range(NUM_BYTE_TOKENS):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in sorted(trained_vocab.items(), key=lambda item: item[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    # Pad (only if the corpus ran out of merges) with inert filler tokens.
    num_filler = 0
    while len(vocab) < vocab_size:
        vocab[f"<extra_{num_filler}>"] = len(vocab)
        num_filler += 1
    if len(vocab) > vocab_size:
        kept = {token for token, i in vocab.items() if i < vocab_size}
        vocab = {token: i for token, i in vocab.items() if i < vocab_size}
        merges = [(a, b) for a, b in merges if a in kept and b in kept and a + b in kept]

    # 3. Assemble the Llama-2-style tokenizer.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", BOS_ID)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    hf_tok.save_pretrained(out_dir)
    # Record the BOS/EOS policy explicitly (read by llama.cpp's converter as well).
    config_path = Path(out_dir) / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config.update({"add_bos_token": True, "add_eos_token": False})
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")


def _stamp(arch: str, config_kwargs: dict[str, Any], dtype: str, seed: int) -> dict[str, Any]:
    return {
        "version": STAMP_VERSION,
        "arch": arch,
        "config": config_kwargs,
        "dtype": dtype,
        "seed": seed,
    }


def make_random_model(arch: str, out_dir: str, **overrides: Any) -> str:
    """Build (or reuse) a random-weight model of Hugging Face ``model_type`` ``arch``.

    ``arch`` is one of ``ARCH_DEFAULTS`` (``llama``, ``mixtral``, ``qwen2_moe``, ``qwen3_moe``)
    or any other ``model_type`` known to transformers (then pass the full shape in
    ``overrides``). Special keyword arguments: ``dtype`` (``"float32"``, ``"bfloat16"``,
    ``"float16"``) and ``seed``; every other keyword is a config field. Returns ``out_dir``.
    """
    dtype = str(overrides.pop("dtype", "float32"))
    seed = int(overrides.pop("seed", 0))
    config_kwargs: dict[str, Any] = {
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "rms_norm_eps": 1e-5,
    }
    config_kwargs.update(ARCH_DEFAULTS.get(arch, {}))
    config_kwargs.update(overrides)
    if "head_dim" not in config_kwargs:
        config_kwargs["head_dim"] = (
            config_kwargs["hidden_size"] // config_kwargs["num_attention_heads"]
        )

    out = Path(out_dir)
    stamp = _stamp(arch, config_kwargs, dtype, seed)
    stamp_path = out / STAMP_FILE
    if stamp_path.is_file():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return str(out)
        except json.JSONDecodeError:
            pass
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    from tessera.random_models import build_random_model

    # The weights as tests build them; the tokenizer is this module's trained BPE.
    build_random_model(arch, out, seed=seed, tokenizer=False, dtype=dtype,
                       generation={"bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
                                   "pad_token_id": EOS_ID}, **config_kwargs)

    build_tokenizer(str(out), config_kwargs["vocab_size"], seed=seed)
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return str(out)


def make_random_llama(
    out_dir: str,
    hidden_size: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    num_kv_heads: int = 12,
    intermediate_size: int = 2048,
    vocab_size: int = 32000,
    max_position_embeddings: int = 4096,
    dtype: str = "float32",
    seed: int = 0,
) -> str:
    """Build (or reuse) a random-weight ``LlamaForCausalLM`` plus tokenizer in ``out_dir``.

    The defaults give a ~110M-parameter model (hidden 768, 12 layers, vocab 32000).
    Returns ``out_dir``.
    """
    return make_random_model(
        "llama",
        out_dir,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        dtype=dtype,
        seed=seed,
    )


def main() -> None:
    """CLI: build a random model directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--arch", default="llama", help="Hugging Face model_type")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = make_random_model(args.arch, args.out, dtype=args.dtype, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
