"""The README's main command: Tessera's OpenAI-compatible server on the bundled demo model.

``python -m tessera.demo`` starts ``tessera serve`` on the trained demo model (a small Llama
that adds numbers, copies or reverses strings, and calls an ``add`` tool), streams a few chat
answers through the HTTP API as they are generated, runs one agent turn (a sum asked for
through a tool schema comes back as a tool call, which the demo checks and runs), then sends
a burst of concurrent streamed chats and reports accuracy, output throughput and time to first
token, and finally stops the server with SIGINT (its graceful shutdown) and checks it exited
cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tessera.demo_model import SERVED_NAME, model_dir
from tessera.demo_model.tasks import (
    Example,
    addition,
    copy,
    held_out_additions,
    is_correct,
    reverse,
    word,
)

# Enough for the longest worked sum ("9+9=18, 9+9+1=19, 9+9+1=19, so 999+999=1998.").
MAX_TOKENS = 48
SHOWCASE = [addition(347, 58), addition(999, 1), reverse("tessera"), copy("paged")]


@dataclass
class ChatResult:
    """One streamed chat: its text, token count and timings."""

    text: str
    num_output_tokens: int
    ttft_s: float
    e2e_s: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(path: Path, port: int, num_threads: int | None) -> subprocess.Popen:
    """``tessera serve`` in a child process; its errors go to our stderr."""
    cmd = [
        sys.executable, "-m", "tessera.cli", "serve", str(path), "--port", str(port),
        "--served-model-name", SERVED_NAME, "--dtype", "float32", "--device", "cpu",
        "--kv-cache-memory", str(64 << 20),
    ]  # fmt: skip
    if num_threads:
        cmd += ["--threads", str(num_threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)


def wait_healthy(proc: subprocess.Popen, base_url: str, timeout_s: float = 120.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} while starting")
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not healthy after {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGINT (graceful drain, engine core stopped), SIGKILL only if it hangs; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


async def stream_chat(
    client: httpx.AsyncClient, question: str, max_tokens: int, echo: bool = False
) -> ChatResult:
    """One greedy streamed chat completion; prints the answer's pieces as they come if ``echo``."""
    body = {
        "model": SERVED_NAME, "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    start_s = time.perf_counter()
    ttft_s, num_tokens = 0.0, 0
    pieces: list[str] = []
    async with client.stream("POST", "/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                num_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content") or ""
                if not piece:  # the opening role chunk and the closing finish chunk
                    continue
                if not pieces:
                    ttft_s = time.perf_counter() - start_s
                pieces.append(piece)
                if echo:
                    print(piece, end="", flush=True)
    return ChatResult("".join(pieces), num_tokens, ttft_s, time.perf_counter() - start_s)


ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}


def valid_add_arguments(arguments: str) -> dict[str, int] | None:
    """The arguments if they satisfy ``ADD_TOOL``'s schema, else None."""
    try:
        args = json.loads(arguments)
    except ValueError:
        return None
    ok = (isinstance(args, dict) and set(args) == {"a", "b"}
          and all(type(v) is int for v in args.values()))
    return args if ok else None


async def agent_turn(client: httpx.AsyncClient, a: int, b: int) -> None:
    """Ask for a sum through the ``add`` tool; the reply is a call, which we check and run."""
    question = f"What is {a}+{b}?"
    body = {
        "model": SERVED_NAME, "messages": [{"role": "user", "content": question}],
        "tools": [ADD_TOOL], "tool_choice": {"type": "function", "function": {"name": "add"}},
        "max_tokens": MAX_TOKENS, "temperature": 0,
    }  # fmt: skip
    r = await client.post("/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    choice = r.json()["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    function = call["function"]
    args = valid_add_arguments(function["arguments"])
    print(f"  user:      {question}   (tools: add(a: int, b: int))")
    if args is None:
        print(f"  tool call: {function['name']}({function['arguments']})  INVALID arguments")
        raise RuntimeError("the tool call's arguments do not match the tool's schema")
    result = args["a"] + args["b"]
    mark = "correct" if args == {"a": a, "b": b} else f"expected a={a}, b={b}"
    print(f"  tool call: {function['name']}({function['arguments']})  "
          f"[finish_reason {choice['finish_reason']}, arguments valid, {mark}] -> {result}")


def burst_questions(num: int, seed: int = 7) -> list[Example]:
    """Held-out additions (never seen in training) mixed with copy and reverse tasks."""
    rng = random.Random(seed)
    sums = held_out_additions(num, seed=seed)
    return [sums[i] if i % 4 else rng.choice((copy, reverse))(word(rng)) for i in range(num)]


async def run_demo(base_url: str, num_burst: int) -> None:
    async with httpx.AsyncClient(base_url=f"{base_url}/v1", timeout=120.0) as client:
        print("Streamed chats, one at a time:")
        for ex in SHOWCASE:
            print(f"  user:      {ex.question}\n  assistant: ", end="", flush=True)
            res = await stream_chat(client, ex.question, max_tokens=MAX_TOKENS, echo=True)
            mark = "correct" if is_correct(ex, res.text) else f"wrong, expected {ex.result}"
            print(f"   ({mark}; first token after {res.ttft_s * 1000:.0f} ms)")

        print("\nAn agent turn: the sum asked for through a tool schema comes back as a call:")
        await agent_turn(client, 347, 58)

        questions = burst_questions(num_burst)
        print(f"\n{num_burst} streamed chats at once (held-out sums, copies, reversals):")
        start_s = time.perf_counter()
        chats = (stream_chat(client, q.question, MAX_TOKENS) for q in questions)
        results = await asyncio.gather(*chats)
        elapsed_s = time.perf_counter() - start_s
    for q, res in list(zip(questions, results, strict=True))[:6]:
        print(f"  {q.question:<24} -> {res.text}")
    num_correct = sum(is_correct(q, r.text) for q, r in zip(questions, results, strict=True))
    num_tokens = sum(r.num_output_tokens for r in results)
    ttfts_ms = sorted(r.ttft_s * 1000 for r in results)
    print(
        f"\n{num_correct}/{num_burst} correct; {num_tokens} tokens generated in {elapsed_s:.2f} s "
        f"({num_tokens / elapsed_s:.0f} output tokens/s over HTTP); "
        f"TTFT p50 {ttfts_ms[len(ttfts_ms) // 2]:.0f} ms, max {ttfts_ms[-1]:.0f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tessera.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--num-burst", type=int, default=64, help="concurrent chats in the burst")
    parser.add_argument("--threads", type=int, default=None, help="engine CPU threads")
    parser.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    args = parser.parse_args(argv)
    if args.num_burst < 1:
        print("demo: --num-burst must be positive", file=sys.stderr)
        return 2
    try:
        path = model_dir()
    except FileNotFoundError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    port = args.port or _free_port()
    base_url = f"http://127.0.0.1:{port}"
    print(f"starting tessera serve on {base_url} (model {SERVED_NAME}) ...", flush=True)
    proc = start_server(path, port, args.threads)
    failure = None
    try:
        wait_healthy(proc, base_url)
        asyncio.run(run_demo(base_url, args.num_burst))
    except (RuntimeError, httpx.HTTPError) as e:
        failure = str(e)
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        code = stop_server(proc)
    if failure:
        print(f"\ndemo: {failure}", file=sys.stderr)
        return 1
    print(f"server stopped (exit code {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
