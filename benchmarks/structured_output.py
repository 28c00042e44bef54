"""Structured outputs: what a JSON schema costs a decode, and what compiling one costs.

Model: the ~110M-parameter random Llama of ``offline_throughput.py`` (vocab 32000, a trained
byte-fallback BPE), float32. Decode: prompts of 64 tokens, 128 generated tokens each, greedy,
at batch 1 and 32, first unconstrained, then constrained by a JSON schema whose shortest
valid output is longer than 128 tokens (so every request emits exactly 128 tokens in both
runs). The overhead is the constrained run's output tokens/s against the unconstrained one's,
in the same process. Target: at most 10%.

Compile: each schema's grammar built cold (no cache) for the same tokenizer with llguidance
(Tessera's grammar engine) and, as the peer, xgrammar (the engine vLLM and SGLang default
to; installed by ``make bench-deps``, without the triton it pulls for GPU kernels), plus the
mean time to compute one token mask along a valid output.

    python benchmarks/structured_output.py [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.models import make_random_llama  # noqa: E402

MODEL_DIR = REPO_ROOT / ".bench" / "models" / "llama-100m"
PROMPT_TOKENS = 64
OUTPUT_TOKENS = 128
ROUNDS = 3

ROWS: dict[str, Any] = {
    "type": "array",
    "minItems": 40,
    "maxItems": 40,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 9999},
            "name": {"type": "string", "maxLength": 12},
            "ok": {"type": "boolean"},
        },
        "required": ["id", "name", "ok"],
        "additionalProperties": False,
    },
}
SCHEMAS: dict[str, Any] = {
    "small object": {"type": "object", "properties": {"answer": {"type": "string"},
                                                      "score": {"type": "number"}},
                     "required": ["answer", "score"]},
    "rows (decode)": ROWS,
    "tool call, 3 tools": {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": name}, "arguments": {
            "type": "object", "properties": {f"{name}_{i}": {"type": t} for i, t in
                                             enumerate(["string", "integer", "boolean"])},
            "required": [f"{name}_0"]}}, "required": ["name", "arguments"]}
        for name in ("search", "fetch", "sum")]}},
    "wide, 60 fields": {"type": "object", "properties": {
        f"field_{i}": {"type": ["string", "integer", "boolean", "null"][i % 4]}
        for i in range(60)}, "required": [f"field_{i}" for i in range(0, 60, 3)]},
    "enums and formats": {"type": "object", "properties": {
        "when": {"type": "string", "format": "date-time"},
        "id": {"type": "string", "format": "uuid"},
        "level": {"enum": ["debug", "info", "warning", "error"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2,8}$"}}},
        "required": ["when", "id", "level"]},
}


def decode(model_dir: str, threads: int) -> list[dict[str, Any]]:
    from tessera import LLM, SamplingParams
    from tessera.structured.spec import StructuredOutputs

    llm = LLM(model_dir, dtype="float32", device="cpu", num_threads=threads,
              kv_cache_memory=2 << 30)
    constraint = StructuredOutputs.json_schema(ROWS)
    rows = []
    for batch in (1, 32):
        prompts = [[300 + (i * 7 + j) % 20000 for j in range(PROMPT_TOKENS)]
                   for i in range(batch)]
        result: dict[str, Any] = {"batch": batch}
        runs: dict[str, list[float]] = {"plain": [], "json": []}
        # Warm both modes at the full batch (kernels, the heap at this size, the grammar's
        # cache), then alternate: each figure is the median of ROUNDS runs.
        for structured in (None, constraint):
            llm.generate(prompts, SamplingParams(max_tokens=4, structured=structured),
                         use_tqdm=False)
        for _ in range(ROUNDS):
            for name, structured in (("plain", None), ("json", constraint)):
                params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS,
                                        ignore_eos=structured is None, structured=structured)
                start_s = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                wall_s = time.perf_counter() - start_s
                num_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                assert num_tokens == batch * OUTPUT_TOKENS, "every request must emit 128 tokens"
                if structured is not None:
                    for o in outs:  # cut at 128 tokens: a valid prefix of the schema's output
                        assert o.outputs[0].text.startswith('[{"id": ')
                runs[name].append(num_tokens / wall_s)
        for name, rates in runs.items():
            result[f"{name}_tok_s"] = statistics.median(rates)
        result["overhead_pct"] = 100 * (1 - result["json_tok_s"] / result["plain_tok_s"])
        rows.append(result)
    return rows


def compile_times(model_dir: str) -> list[dict[str, Any]]:
    import llguidance
    from transformers import AutoTokenizer

    from tessera.structured.compiler import grammar_tokenizer
    from tessera.structured.grammar import to_grammar
    from tessera.structured.spec import StructuredOutputs

    hf = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(hf)
    ll_tok = grammar_tokenizer(hf, vocab)
    try:
        import xgrammar as xgr

        xgr_info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    except ImportError:
        xgr = None
    rows = []
    for name, schema in SCHEMAS.items():
        text = json.dumps(schema)
        row: dict[str, Any] = {"schema": name}
        start_s = time.perf_counter()
        matcher = llguidance.LLMatcher(ll_tok, to_grammar(StructuredOutputs(json=text)))
        row["llguidance_compile_ms"] = 1e3 * (time.perf_counter() - start_s)
        assert not matcher.is_error(), matcher.get_error()
        tokens = _valid_tokens(matcher, vocab)
        row["llguidance_mask_us"] = statistics.median(
            _ll_walk(matcher, tokens, vocab) for _ in range(3))
        if xgr is not None:
            compiler = xgr.GrammarCompiler(xgr_info, max_threads=1, cache_enabled=False)
            start_s = time.perf_counter()
            compiled = compiler.compile_json_schema(text, any_whitespace=False,
                                                    separators=(", ", ": "))
            row["xgrammar_compile_ms"] = 1e3 * (time.perf_counter() - start_s)
            row["xgrammar_mask_us"] = statistics.median(
                _xgr_walk(xgr, compiled, tokens, vocab) for _ in range(3))
        rows.append(row)
    return rows


def _valid_tokens(matcher: Any, vocab: int, limit: int = 64) -> list[int]:
    """A valid output's tokens: at each step the allowed token with the smallest id."""
    import llguidance.torch

    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    tokens = []
    for _ in range(limit):
        if matcher.is_stopped():
            break
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        bits = [(int(w) & 0xFFFFFFFF) for w in mask[0].tolist()]
        token = next(32 * i + (w & -w).bit_length() - 1 for i, w in enumerate(bits) if w)
        if token >= vocab or not matcher.consume_token(token):
            break
        tokens.append(token)
    return tokens


def _ll_walk(matcher: Any, tokens: list[int], vocab: int) -> float:
    import llguidance.torch

    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    matcher.reset()
    start_s = time.perf_counter()
    for t in tokens:
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        matcher.consume_token(t)
    return 1e6 * (time.perf_counter() - start_s) / max(1, len(tokens))


def _xgr_walk(xgr: Any, compiled: Any, tokens: list[int], vocab: int) -> float:
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    start_s = time.perf_counter()
    for t in tokens:
        matcher.fill_next_token_bitmask(mask)
        matcher.accept_token(t)
    return 1e6 * (time.perf_counter() - start_s) / max(1, len(tokens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    model_dir = make_random_llama(str(MODEL_DIR))
    compiled = compile_times(model_dir)
    print("\nGrammar compile (cold) and mask time per token, vocab 32000")
    print(f"{'schema':<20} {'llguidance ms':>14} {'xgrammar ms':>12} "
          f"{'llg mask us':>12} {'xgr mask us':>12}")
    for r in compiled:
        print(f"{r['schema']:<20} {r['llguidance_compile_ms']:>14.2f} "
              f"{r.get('xgrammar_compile_ms', float('nan')):>12.2f} "
              f"{r['llguidance_mask_us']:>12.1f} {r.get('xgrammar_mask_us', float('nan')):>12.1f}")
    decoded = decode(model_dir, args.threads)
    print(f"\nDecode, {PROMPT_TOKENS}-token prompts, {OUTPUT_TOKENS} tokens each, "
          f"{args.threads} threads")
    print(f"{'batch':>5} {'plain tok/s':>12} {'json tok/s':>11} {'overhead':>9}")
    for r in decoded:
        print(f"{r['batch']:>5} {r['plain_tok_s']:>12.1f} {r['json_tok_s']:>11.1f} "
              f"{r['overhead_pct']:>8.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"compile": compiled, "decode": decoded},
                                              indent=2))


if __name__ == "__main__":
    main()
