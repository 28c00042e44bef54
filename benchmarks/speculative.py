"""Speculative decoding at batch 1: prompt-lookup (n-gram) drafts against none, Tessera and
llama.cpp, same model, same requests, one run.

Model: the bundled demo model (float32), asked its three tasks in chat form: copying and
reversing a word, and adding two numbers with a worked sum (its held-out pairs). Copies repeat
the prompt, so drafts taken from it are right; reversals and sums repeat little of it.

Both systems serve over HTTP with one thread and take the same token-id prompts, one request
at a time (``/v1/completions``, greedy, at most 64 tokens, EOS ends a request):

- Tessera: ``tessera serve``, without and with ``--speculative-method ngram``.
- llama.cpp: ``llama-server`` (built from the llama-cpp-python sdist, see
  ``benchmarks/peers/llama_server.py``) on the model converted to an f32 GGUF, without and with
  ``--spec-type ngram-simple`` (its prompt lookup, which looks up one n-gram size: 2 here, where
  Tessera tries 4 down to 1; drafts of up to 8 tokens in both). llama.cpp's converter needs a BPE vocabulary with merges, so the GGUF's
  tokenizer is the demo model's characters with one merge (``a b``) in place of an unused
  token; prompts are token ids, so no text is tokenized.

Output tokens/s is a task's completion tokens over the sum of its requests' latencies as the
client measures them (prefill included). Acceptance is accepted over drafted tokens, from
Tessera's /metrics and llama-server's per-request timings. Every Tessera output with drafts is
checked against the one without.

Also, offline (``LLM``, no HTTP), Tessera's decode rate after the first token with and without
drafts, where the 1.8x target of the copy task is measured.

    python benchmarks/speculative.py [--requests 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.peers.llama_server import ensure_llama_server  # noqa: E402
from benchmarks.peers.llamacpp import convert_to_gguf  # noqa: E402
from benchmarks.serving import _free_port, _stop, _wait_ready  # noqa: E402
from tessera.demo_model import model_dir  # noqa: E402
from tessera.demo_model.tasks import copy, held_out_additions, reverse, word  # noqa: E402
from tessera.demo_model.train import render  # noqa: E402

GGUF = REPO_ROOT / ".bench" / "models" / "demo-f32.gguf"
MAX_TOKENS = 64
DRAFT_TOKENS = 8
LOOKUP_N = 2  # llama.cpp's ngram-simple looks up one n-gram size


def prompts(tokenizer: Any, num: int) -> dict[str, list[list[int]]]:
    rng = random.Random(0)
    tasks = {"copy": [copy(word(rng)) for _ in range(num)],
             "reverse": [reverse(word(rng)) for _ in range(num)],
             "sum": held_out_additions(num)}
    return {name: [tokenizer.encode(render(e)[0], add_special_tokens=False) for e in examples]
            for name, examples in tasks.items()}


def bpe_copy(src: Path, dst: Path) -> Path:
    """The demo model with a BPE tokenizer llama.cpp's converter takes (see the docstring)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    unused = max(vocab, key=vocab.get)
    assert unused.startswith("<unused"), unused
    vocab["ab"] = vocab.pop(unused)
    tok["model"] = {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                    "continuing_subword_prefix": None, "end_of_word_suffix": None,
                    "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": vocab, "merges": [["a", "b"]]}
    for added in tok.get("added_tokens", []):
        if added["content"] == unused:
            added["content"] = "ab"
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


def metric(base_url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_server(label: str, command: list[str], work: dict[str, list[list[int]]],
               log: Any) -> dict[str, Any]:
    port = int(command[command.index("--port") + 1])
    base_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    print(f"  {label} ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    tessera = "tessera.cli" in command
    result: dict[str, Any] = {}
    try:
        _wait_ready(proc, base_url)
        with httpx.Client(timeout=120) as client:
            url = f"{base_url}/v1/completions"
            body = {"model": "demo", "max_tokens": MAX_TOKENS, "temperature": 0}
            for warm in work["copy"][:3]:
                client.post(url, json=body | {"prompt": warm}).raise_for_status()
            for task, task_prompts in work.items():
                drafted = accepted = 0.0
                if tessera:
                    drafted0 = metric(base_url, "tessera:spec_decode_num_draft_tokens_total")
                    accepted0 = metric(base_url, "tessera:spec_decode_num_accepted_tokens_total")
                num_tokens, seconds, texts = 0, 0.0, []
                for ids in task_prompts:
                    start = time.perf_counter()
                    r = client.post(url, json=body | {"prompt": ids})
                    seconds += time.perf_counter() - start
                    r.raise_for_status()
                    out = r.json()
                    num_tokens += out["usage"]["completion_tokens"]
                    texts.append(out["choices"][0]["text"])
                    timings = out.get("timings") or {}
                    drafted += timings.get("draft_n", 0)
                    accepted += timings.get("draft_n_accepted", 0)
                if tessera:
                    drafted = metric(base_url, "tessera:spec_decode_num_draft_tokens_total") - drafted0
                    accepted = (metric(base_url, "tessera:spec_decode_num_accepted_tokens_total")
                                - accepted0)
                result[task] = {"tokens": num_tokens, "seconds": seconds,
                                "tok_s": num_tokens / seconds, "texts": texts,
                                "acceptance": accepted / drafted if drafted else None}
    finally:
        _stop(proc)
    return result


def offline_decode(work: dict[str, list[list[int]]], threads: int) -> dict[str, dict[str, float]]:
    """Tessera's decode rate after each request's first token, with and without drafts."""
    import torch

    from tessera import LLM, SamplingParams

    torch.set_num_threads(threads)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    rates: dict[str, dict[str, float]] = {}
    for label, options in (("none", {}), ("ngram", dict(
            speculative_method="ngram", num_speculative_tokens=DRAFT_TOKENS))):
        llm = LLM(str(model_dir()), dtype="float32", num_threads=threads, **options)
        engine = llm.engine
        for task, task_prompts in work.items():
            for rep in range(2):  # the first pass warms up
                num_tokens, seconds = 0, 0.0
                for i, ids in enumerate(task_prompts):
                    engine.add_request(f"{task}-{rep}-{i}", ids, params)
                    first_s = None
                    while engine.has_unfinished_requests():
                        step = engine.step_with_deltas()
                        if first_s is None and step.deltas:
                            first_s = time.perf_counter()
                            num_first = len(step.deltas)
                        for done in step.finished:
                            num_tokens += len(done.outputs[0].token_ids) - num_first
                    assert first_s is not None
                    seconds += time.perf_counter() - first_s
            rates.setdefault(task, {})[label] = num_tokens / seconds
        llm.close()
    return rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=48, help="requests per task")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llama-server", help="a built llama-server (default: build one)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from tessera.engine.detokenizer import load_tokenizer

    work = prompts(load_tokenizer(str(model_dir())), args.requests)
    server = args.llama_server or str(ensure_llama_server())
    with tempfile.TemporaryDirectory() as tmp:
        convert_to_gguf(str(bpe_copy(model_dir(), Path(tmp) / "demo-bpe")), str(GGUF), "f32")
    tessera = [sys.executable, "-m", "tessera.cli", "serve", str(model_dir()),
               "--served-model-name", "demo", "--dtype", "float32", "--device", "cpu",
               "--threads", str(args.threads), "--max-num-seqs", "1"]
    llama = [server, "-m", str(GGUF), "--host", "127.0.0.1", "--threads", str(args.threads),
             "--threads-batch", str(args.threads), "--parallel", "1", "--ctx-size", "512",
             "--alias", "demo"]
    systems = {
        ("Tessera", "none"): tessera,
        ("Tessera", "ngram"): tessera + [
            "--speculative-method", "ngram", "--num-speculative-tokens", str(DRAFT_TOKENS)],
        ("llama.cpp", "none"): llama,
        ("llama.cpp", "ngram"): llama + [
            "--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(LOOKUP_N),
            "--spec-ngram-simple-size-m", str(DRAFT_TOKENS)],
    }
    results: dict[str, dict[str, Any]] = {}
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        print(f"server logs: {log.name}", file=sys.stderr)
        for (system, drafts), command in systems.items():
            port = _free_port()
            results[f"{system}/{drafts}"] = run_server(
                f"{system}, drafts {drafts}", command + ["--port", str(port)], work, log)
    offline = offline_decode(work, args.threads)

    same = all(results["Tessera/ngram"][t]["texts"] == results["Tessera/none"][t]["texts"]
               for t in work)
    print(f"\nbatch 1, {args.requests} requests per task, {args.threads} thread(s), "
          f"demo model float32; drafts: up to {DRAFT_TOKENS} tokens (llama.cpp looks up "
          f"{LOOKUP_N}-grams, Tessera 4- to 1-grams)\n")
    head = (f"{'task':<8} {'system':<10} {'out tok/s':>10} {'ngram tok/s':>12} "
            f"{'speed-up':>9} {'acceptance':>11}")
    print(head)
    print("-" * len(head))
    for task in work:
        for system in ("Tessera", "llama.cpp"):
            plain, spec = results[f"{system}/none"][task], results[f"{system}/ngram"][task]
            acc = spec["acceptance"]
            print(f"{task:<8} {system:<10} {plain['tok_s']:>10.0f} {spec['tok_s']:>12.0f} "
                  f"{spec['tok_s'] / plain['tok_s']:>8.2f}x "
                  f"{'-' if acc is None else f'{acc:.0%}':>11}")
    print(f"\nTessera's outputs with drafts identical to those without: {same}")
    print("\nTessera offline, decode tok/s after the first token:")
    print(f"{'task':<8} {'none':>8} {'ngram':>8} {'speed-up':>9}")
    for task, r in offline.items():
        print(f"{task:<8} {r['none']:>8.0f} {r['ngram']:>8.0f} {r['ngram'] / r['none']:>8.2f}x")
    if args.json:
        for r in results.values():
            for t in r.values():
                t.pop("texts")
        Path(args.json).write_text(json.dumps({"http": results, "offline": offline,
                                               "identical": same}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
