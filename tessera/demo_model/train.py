"""Train the bundled demo model: a small Llama that answers addition, copy and reverse chats.

    python -m tessera.demo_model.train [--out DIR] [--steps N]

Runs on CPU and is deterministic on a given CPU and torch build: fixed seeds, a fixed thread
count (2), torch's deterministic algorithms, examples drawn from a seeded ``random.Random``. The result is
a Hugging Face model directory (``LlamaForCausalLM``, float16 safetensors) with a
character-level tokenizer and a chat template; by default it overwrites the copy shipped in this
package. Each training sequence is one chat rendered exactly as the chat template renders it,
and the loss covers only the answer tokens and the end-of-sequence token.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import string
import sys
import time
from pathlib import Path
from typing import Any

from tessera.demo_model.tasks import (
    Example,
    addition,
    copy,
    held_out_additions,
    held_out_pairs,
    is_correct,
    reverse,
    tool_call,
    training_example,
    word,
)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
# Printable ASCII plus newline and tab: every character of the tasks and of ordinary English.
CHARACTERS = [c for c in string.printable if c not in "\r\x0b\x0c"]
VOCAB_SIZE = 128  # the 7 special tokens and 98 characters, padded to a round size

# Renders exactly what ``render`` below produces for a single-turn chat; offered tools are
# listed by name in a system turn first.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>"
    "{{ tools | map(attribute='function.name') | join(',') }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

MODEL_CONFIG: dict[str, Any] = dict(
    hidden_size=192,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=6,
    intermediate_size=576,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=SPECIAL_TOKENS.index(BOS),
    eos_token_id=SPECIAL_TOKENS.index(EOS),
    pad_token_id=SPECIAL_TOKENS.index(PAD),
)

# The tokenizer zero-pads 1- and 2-digit numbers to three digits when encoding ("347+58" is
# seen as "347+058"): the operands' digits then sit in fixed columns, so the model need not
# learn to align numbers of different lengths. Only the model's input changes; answers are
# generated, and read, without padding. (Zero-width regex matches, applied in order.)
NUMBER_PADDING = (
    (r"(?<![0-9])(?=[0-9](?![0-9]))", "00"),
    (r"(?<![0-9])(?=[0-9]{2}(?![0-9]))", "0"),
)

SEED = 0
NUM_THREADS = 2
SEQ_LEN = 68  # the longest example: a spaced 999 + 999 with its worked answer, 67 tokens
MAX_ANSWER_TOKENS = 48  # the longest answer (46 characters) and its EOS, with room to spare
EVAL_EVERY_STEPS = 250
STOP_ACCURACY = 0.99  # training stops early once every held-out check reaches this


def vocabulary() -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"<unused{i}>"] = i
    return vocab


def write_tokenizer(out: Path) -> Any:
    """A character-level tokenizer (one token per character; role markers are single tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(vocab=vocabulary(), unk_token=UNK, max_input_chars_per_word=10**6))
    # Every character is its own word, so WordPiece is a pure character lookup.
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(pattern), zeros) for pattern, zeros in NUMBER_PADDING]
    )
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
    )
    fast.save_pretrained(str(out))
    # The chat template goes into tokenizer_config.json, where every loader looks for it
    # (transformers 5 alone would write a separate chat_template.jinja).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return PreTrainedTokenizerFast.from_pretrained(str(out))


def render(example: Example) -> tuple[str, str]:
    """(prompt text, answer text) of one chat, as the chat template renders it."""
    system = f"<|system|>{','.join(example.tools)}" if example.tools else ""
    return f"{BOS}{system}<|user|>{example.question}<|assistant|>", f"{example.answer}{EOS}"


def pad_numbers(text: str) -> str:
    """What the tokenizer's normalizer does to text: 1- and 2-digit numbers padded to three."""
    for pattern, zeros in NUMBER_PADDING:
        text = re.sub(pattern, zeros, text)
    return text


def encode(text: str, vocab: dict[str, int], normalize: bool = True) -> list[int]:
    """Character-level ids, role markers and BOS/EOS as single tokens: what the tokenizer does
    (``normalize``) or, without number padding, the ids of a generated answer."""
    if normalize:
        text = pad_numbers(text)
    ids: list[int] = []
    i = 0
    while i < len(text):
        for special in SPECIAL_TOKENS:
            if text.startswith(special, i):
                ids.append(vocab[special])
                i += len(special)
                break
        else:
            ids.append(vocab.get(text[i], vocab[UNK]))
            i += 1
    return ids


def make_batch(rng: random.Random, batch_size: int, vocab: dict[str, int]) -> tuple[Any, Any]:
    """Input ids [batch, seq] and labels [batch, seq] (-100 outside the answers)."""
    import torch

    rows: list[tuple[list[int], list[int]]] = []
    for _ in range(batch_size):
        prompt, answer = render(training_example(rng))
        p_ids, a_ids = encode(prompt, vocab), encode(answer, vocab, normalize=False)
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    # One fixed length keeps the compiled training step to a single graph.
    seq_len = SEQ_LEN
    if max(len(ids) for ids, _ in rows) > seq_len:
        raise ValueError(f"a training example is longer than {seq_len} tokens")
    pad = vocab[PAD]
    input_ids = torch.tensor([ids + [pad] * (seq_len - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (seq_len - len(lab)) for _, lab in rows])
    return input_ids, labels


def greedy_answers(model: Any, questions: list[Example], vocab: dict[str, int]) -> list[str]:
    """Greedy answers with plain transformers (a training-time check, left-padded batch)."""
    import torch

    inv = {i: t for t, i in vocab.items()}
    prompts = [encode(render(q)[0], vocab) for q in questions]
    seq_len = max(map(len, prompts))
    ids = torch.tensor([[vocab[PAD]] * (seq_len - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (seq_len - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False,
            eos_token_id=vocab[EOS], pad_token_id=vocab[PAD],
        )  # fmt: skip
    answers = []
    for row in out[:, seq_len:].tolist():
        text = ""
        for t in row:
            if t == vocab[EOS] or t == vocab[PAD]:
                break
            text += inv[t]
        answers.append(text)
    return answers


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        return set()


def train(out: Path, num_steps: int, batch_size: int, lr: float, compile_model: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    vocab = vocabulary()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(out)
    probe = addition(7, 45)
    prompt, answer = render(probe)
    chat = [{"role": "user", "content": probe.question}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == prompt
    assert tokenizer.encode(prompt, add_special_tokens=False) == encode(prompt, vocab)
    probe = tool_call(7, 45)
    tools = [{"type": "function", "function": {"name": "add"}}]
    chat = [{"role": "user", "content": probe.question}]
    assert tokenizer.apply_chat_template(chat, tools=tools, tokenize=False,
                                         add_generation_prompt=True) == render(probe)[0]

    config = LlamaConfig(architectures=["LlamaForCausalLM"], **MODEL_CONFIG)
    model: Any = LlamaForCausalLM(config)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"{num_params / 1e6:.2f}M parameters, {num_steps} steps of {batch_size}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, num_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, num_steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    # bfloat16 autocast where the CPU has native bfloat16 (AMX or AVX-512 BF16), which runs the
    # matmuls several times faster; elsewhere bfloat16 is emulated and slower than float32.
    use_bf16 = torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX") or any(
        flag in _cpu_flags() for flag in ("avx512_bf16", "amx_bf16"))

    def train_loss(input_ids: Any, labels: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            return model(input_ids=input_ids, labels=labels).loss

    # Compiling fuses the many small elementwise ops of a model this size (about 2x on CPU).
    step_loss = torch.compile(train_loss) if compile_model else train_loss
    rng = random.Random(SEED)
    eval_set = held_out_additions(200)
    # Copy/reverse words from a stream training never draws from (its rng is seeded with SEED).
    word_rng = random.Random(SEED + 1)
    word_set = [task(word(word_rng)) for task in (copy, reverse) for _ in range(50)]
    tool_set = [tool_call(*pair) for pair in held_out_pairs(100)]
    start_s = time.perf_counter()
    model.train()
    acc = word_acc = tool_acc = 0.0
    step = 0
    for step in range(num_steps):
        input_ids, labels = make_batch(rng, batch_size, vocab)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = step_loss(input_ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == num_steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start_s:6.0f} s",
                flush=True,
            )
        if step % EVAL_EVERY_STEPS == EVAL_EVERY_STEPS - 1 or step == num_steps - 1:
            model.eval()
            answers = greedy_answers(model, eval_set, vocab)
            num_right = sum(is_correct(q, a) for a, q in zip(answers, eval_set, strict=True))
            acc = num_right / len(eval_set)
            answers = greedy_answers(model, word_set, vocab)
            num_right = sum(is_correct(q, a) for a, q in zip(answers, word_set, strict=True))
            word_acc = num_right / len(word_set)
            answers = greedy_answers(model, tool_set, vocab)
            num_right = sum(is_correct(q, a) for a, q in zip(answers, tool_set, strict=True))
            tool_acc = num_right / len(tool_set)
            print(f"step {step:5d}  held-out addition accuracy {acc:.1%}, "
                  f"copy/reverse {word_acc:.1%}, tool calls {tool_acc:.1%}", flush=True)
            model.train()
            # Stop once every task is learned, not just the hardest one.
            if min(acc, word_acc, tool_acc) >= STOP_ACCURACY:
                break
    model.eval()
    model = model.to(torch.float16)
    model.save_pretrained(str(out))
    meta = {"num_steps": step + 1, "planned_steps": num_steps, "held_out_accuracy": acc,
            "copy_reverse_accuracy": word_acc, "tool_call_accuracy": tool_acc, "batch_size": batch_size, "lr": lr, "seed": SEED,
            "num_threads": NUM_THREADS, "bfloat16_autocast": use_bf16, "train_seconds": round(time.perf_counter() - start_s)}  # fmt: skip
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"saved to {out} after {meta['train_seconds']} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tessera.demo_model.train")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    args = parser.parse_args(argv)
    train(args.out, args.steps, args.batch_size, args.lr, not args.no_compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
