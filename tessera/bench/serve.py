"""``tessera bench serve``: load an OpenAI-compatible server and report latency and throughput.

Every request streams from ``/v1/completions``: TTFT is the time to the first chunk that
carries tokens, ITL the gaps between later chunks, TPOT ``(e2e - ttft) / (tokens - 1)``.
Token counts come from the server's ``usage`` (``stream_options.include_usage``) when it sends
one, else from the number of chunks that carry text. Works against Tessera, vLLM, SGLang or llama.cpp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from tessera.bench.datasets import (
    BenchRequest,
    as_text_prompts,
    prefix_requests,
    random_requests,
    sharegpt_requests,
)


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name the server expects")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", default="random", choices=["random", "sharegpt", "prefix"])
    p.add_argument("--dataset-path", default=None, help="ShareGPT-style JSON (for sharegpt)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-vocab-size", type=int, default=256,
                   help="token ids of random prompts are drawn from [0, N)")  # fmt: skip
    p.add_argument("--text-prompts", default=None, metavar="TOKENIZER_DIR",
                   help="send random/prefix prompts as text built from this tokenizer's words "
                   "(for servers that take only text prompts)")  # fmt: skip
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--sharegpt-output-len", type=int, default=None)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (Poisson arrivals); inf sends all at once")  # fmt: skip
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM extension)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--goodput", nargs="*", default=[], metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2e:10000")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


def _requests(args: argparse.Namespace) -> list[BenchRequest]:
    requests = _dataset_requests(args)
    return as_text_prompts(requests, args.text_prompts) if args.text_prompts else requests


def _dataset_requests(args: argparse.Namespace) -> list[BenchRequest]:
    if args.dataset == "random":
        return random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.random_vocab_size, args.seed)  # fmt: skip
    if args.dataset == "prefix":
        return prefix_requests(args.num_prompts, args.prefix_len, args.num_prefixes,
                               args.random_input_len, args.random_output_len,
                               args.random_vocab_size, args.seed)  # fmt: skip
    if not args.dataset_path:
        raise ValueError("--dataset sharegpt needs --dataset-path FILE")
    return sharegpt_requests(args.dataset_path, args.num_prompts, args.sharegpt_output_len,
                             args.seed)  # fmt: skip


def _parse_slos(items: list[str]) -> dict[str, float]:
    slos = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2e") or not value:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2e:MS, got {item!r}")
        slos[key] = float(value) / 1000.0
    return slos


async def _one(
    client: httpx.AsyncClient, args: argparse.Namespace, req: BenchRequest
) -> RequestResult:
    body: dict[str, Any] = {
        "model": args.model, "prompt": req.prompt, "max_tokens": req.num_output_tokens,
        "temperature": args.temperature, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    if args.ignore_eos:
        body["ignore_eos"] = True
    result = RequestResult()
    start_s = last_s = time.perf_counter()
    num_chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    return result
                if chunk.get("usage"):
                    result.num_prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    result.num_output_tokens = chunk["usage"].get("completion_tokens", 0)
                # A closing chunk with only a finish_reason (llama.cpp sends one) is no token.
                if not any(c.get("text") for c in chunk.get("choices") or []):
                    continue
                now_s = time.perf_counter()
                if num_chunks == 0:
                    result.ttft_s = now_s - start_s
                else:
                    result.itl_s.append(now_s - last_s)
                last_s = now_s
                num_chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e_s = time.perf_counter() - start_s
    if not result.num_output_tokens:
        result.num_output_tokens = num_chunks
    if isinstance(req.prompt, list) and not result.num_prompt_tokens:
        result.num_prompt_tokens = len(req.prompt)
    result.ok = num_chunks > 0
    return result


async def run(args: argparse.Namespace, requests: list[BenchRequest]) -> tuple[list, float]:
    """Send every request (Poisson arrivals, bounded concurrency); returns results and the
    benchmark's duration in seconds."""
    rng = np.random.default_rng(args.seed)
    limit = asyncio.Semaphore(args.max_concurrency or len(requests))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    bar = tqdm(total=len(requests), desc="bench", disable=args.no_progress, file=sys.stderr)
    pool = httpx.Limits(max_connections=args.max_concurrency or len(requests))
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers,
                                 timeout=args.timeout, limits=pool) as client:  # fmt: skip

        async def limited(req: BenchRequest) -> RequestResult:
            async with limit:
                result = await _one(client, args, req)
            bar.update(1)
            return result

        start_s = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        duration_s = time.perf_counter() - start_s
    bar.close()
    return list(results), duration_s


def summarize(
    results: list[RequestResult], duration_s: float, slos: dict[str, float]
) -> dict[str, Any]:
    """Throughputs and latency percentiles (ms) over the successful requests."""
    ok = [r for r in results if r.ok]
    num_out = sum(r.num_output_tokens for r in ok)
    num_in = sum(r.num_prompt_tokens for r in ok)
    summary: dict[str, Any] = {
        "num_requests": len(results),
        "num_completed": len(ok),
        "num_failed": len(results) - len(ok),
        "duration_s": duration_s,
        "num_input_tokens": num_in,
        "num_output_tokens": num_out,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": num_out / duration_s,
        "total_token_throughput": (num_in + num_out) / duration_s,
    }
    series = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": [t for r in ok if (t := r.tpot_s) is not None],
        "itl": [x for r in ok for x in r.itl_s],
        "e2e": [r.e2e_s for r in ok],
    }
    for name, values in series.items():
        arr = np.asarray(values or [0.0]) * 1000.0
        summary[f"mean_{name}_ms"] = float(arr.mean())
        for q in (50, 90, 99):
            summary[f"p{q}_{name}_ms"] = float(np.percentile(arr, q))
    if slos:
        good = [
            r for r in ok
            if all((getattr(r, f"{k}_s") or 0.0) <= v for k, v in slos.items())
        ]  # fmt: skip
        summary["goodput"] = len(good) / duration_s
        summary["goodput_slos_ms"] = {k: v * 1000.0 for k, v in slos.items()}
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        summary["errors"] = errors[:5]
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"{'Successful requests':<34}{s['num_completed']:>12}",
        f"{'Failed requests':<34}{s['num_failed']:>12}",
        f"{'Benchmark duration (s)':<34}{s['duration_s']:>12.2f}",
        f"{'Total input tokens':<34}{s['num_input_tokens']:>12}",
        f"{'Total generated tokens':<34}{s['num_output_tokens']:>12}",
        f"{'Request throughput (req/s)':<34}{s['request_throughput']:>12.2f}",
        f"{'Output token throughput (tok/s)':<34}{s['output_throughput']:>12.2f}",
        f"{'Total token throughput (tok/s)':<34}{s['total_token_throughput']:>12.2f}",
    ]
    if "goodput" in s:
        lines.append(f"{'Goodput (req/s)':<34}{s['goodput']:>12.2f}")
    for name, title in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")):
        stats = "  ".join(f"{k} {s[f'{k}_{name}_ms']:8.2f}" for k in ("mean", "p50", "p90", "p99"))
        lines.append(f"{title + ' (ms)':<10}{stats}")
    for err in s.get("errors", []):
        lines.append(f"error: {err}")
    return "\n".join(lines)


def bench_serve_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        slos = _parse_slos(args.goodput)
        requests = _requests(args)
        if not requests:
            raise ValueError("--num-prompts must be at least 1")
        results, duration_s = asyncio.run(run(args, requests))
    except (ValueError, OSError) as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    summary = summarize(results, duration_s, slos)
    print(format_summary(summary))
    if args.json:
        payload = {"args": vars(args), "summary": summary,
                   "requests": [asdict(r) for r in results]}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 0 if summary["num_completed"] else 1
