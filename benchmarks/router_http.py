"""``tessera router`` over HTTP: two running ``tessera serve`` instances behind the router with
the ``kv`` policy, against the same router placing round-robin (what a plain load balancer in
front of two servers does, the peer).

The workload is ``benchmarks/data_parallel.py``'s: ``--groups`` tenants, each with a system
prompt of ``--prefix-len`` tokens; every round sends one request per tenant (its prompt plus a
fresh question), all at once, streamed, and waits for them. Each instance's KV pool holds about
``--pool-prefixes`` system prompts, fewer than there are tenants. Every system gets fresh
servers (one thread each) and a fresh router. Round 1 fills the caches and is not timed.
Reported: throughput (prompt and output tokens over the wall time), TTFT p50/p99 (at the
client, through the router), and the requests each instance took.

    python benchmarks/router_http.py [--groups 8] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.data_parallel import (  # noqa: E402
    BLOCK_SIZE,
    add_workload_args,
    make_rounds,
    pool_size,
)
from benchmarks.offline_throughput import MODEL_DIR  # noqa: E402

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 600.0,
          num_up: int | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with code {proc.returncode}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200 and (num_up is None or r.json()["instances_up"] == num_up):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def _one(client: Any, url: str, prompt: list[int], output_len: int) -> float:
    """Send one streamed request; seconds to its first token."""
    start_s = time.perf_counter()
    first_s = None
    body = {"model": "m", "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if first_s is None and line.startswith("data: {"):
                first_s = time.perf_counter()
    return (first_s or time.perf_counter()) - start_s


async def _rounds(url: str, rounds: list[list[list[int]]], output_len: int) -> dict[str, Any]:
    import httpx

    ttfts_ms: list[float] = []
    wall_s = 0.0
    num_tokens = 0
    async with httpx.AsyncClient(timeout=600) as client:
        for r, prompts in enumerate(rounds):
            start_s = time.perf_counter()
            got = await asyncio.gather(*(_one(client, url, p, output_len) for p in prompts))
            if r == 0:
                continue
            wall_s += time.perf_counter() - start_s
            ttfts_ms += [1000 * t for t in got]
            num_tokens += sum(len(p) for p in prompts) + output_len * len(prompts)
    q = sorted(ttfts_ms)
    return {"tokens_per_s": num_tokens / wall_s, "ttft_p50_ms": statistics.median(q),
            "ttft_p99_ms": q[min(len(q) - 1, int(0.99 * len(q)))], "wall_s": wall_s}


def run(model_dir: str, policy: str, rounds: list[list[list[int]]], output_len: int,
        pool_bytes: int) -> dict[str, Any]:
    import httpx

    procs: list[subprocess.Popen[bytes]] = []
    try:
        urls = []
        for _ in range(2):
            port = _port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tessera.cli", "serve", model_dir, "--served-model-name",
                 "m", "--port", str(port), "--dtype", "float32", "--device", "cpu",
                 "--threads", "1", "--kv-cache-memory", str(pool_bytes),
                 "--max-num-batched-tokens", "2048", "--block-size", str(BLOCK_SIZE)],
                env=ENV, stdout=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs, strict=True):
            _wait(url, proc)
        port = _port()
        router = f"http://127.0.0.1:{port}"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tessera.cli", "router", "--port", str(port),
             "--router-policy", policy, *(a for u in urls for a in ("--instance", u))],
            env=ENV, stdout=subprocess.DEVNULL))
        _wait(router, procs[-1], num_up=2)
        result = asyncio.run(_rounds(router, rounds, output_len))
        placed = {}
        for line in httpx.get(f"{router}/metrics", timeout=10).text.splitlines():
            if line.startswith("tessera:router_routed_requests_total{"):
                placed[line.split('instance="')[1].split('"')[0]] = int(float(line.split()[-1]))
        result["placed"] = [placed.get(u, 0) for u in urls]
        return result
    finally:
        _stop(procs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(p)
    args = p.parse_args(argv)

    from benchmarks.models import make_random_llama

    model_dir = make_random_llama(str(MODEL_DIR))
    rounds = make_rounds(args.groups, args.rounds, args.prefix_len, args.suffix_len, args.seed)
    pool_tokens, pool_bytes = pool_size(args, model_dir)
    print(f"{args.groups} tenants x {args.rounds} rounds (first untimed), system prompts of "
          f"{args.prefix_len} tokens; two servers of one thread, KV pool {pool_tokens} tokens "
          "each, behind 'tessera router'")
    rows = []
    for name, policy in (("router, kv policy", "kv"), ("router, round robin", "round_robin")):
        print(f"  {name} ...", flush=True)
        rows.append((name, run(model_dir, policy, rounds, args.output_len, pool_bytes)))
    print(f"\n{'system':<24}{'tok/s':>8}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}  placed")
    for name, r in rows:
        print(f"{name:<24}{r['tokens_per_s']:>8.0f}{r['ttft_p50_ms']:>13.0f}"
              f"{r['ttft_p99_ms']:>13.0f}  {r['placed']}")
    kv, rr = rows[0][1], rows[1][1]
    print(f"kv / round robin: throughput {kv['tokens_per_s'] / rr['tokens_per_s']:.2f}x, "
          f"TTFT p50 {rr['ttft_p50_ms'] / kv['ttft_p50_ms']:.2f}x lower")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
