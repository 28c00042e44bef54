"""Soak: a server under a bounded mixed load of good, abandoned and hostile requests.

Each system (Tessera, then the peer, llama.cpp's ``llama-server``) serves the ~110M random
Llama of ``benchmarks/models.py`` for ``--minutes`` while ``--clients`` clients loop over a
seeded random mix: streamed and plain completions, streams the client drops after a few
tokens, plain requests the client abandons (a short timeout), bodies over 4 MiB, and hostile
bodies (out-of-range numbers, NaN, broken or deeply nested JSON). The table reports what the
server answered, by kind; anything a server should never do is counted apart: a 5xx, an
error event inside a stream, a broken connection on a well-formed request, or a hang (no
answer within ``--hang-s``). At the end, once idle, it reads the server's RSS (the whole
process tree) against its RSS after warm-up, the requests still running, and the KV cache
still in use (leaked blocks: must be 0; llama-server publishes no KV metric).

    python benchmarks/soak.py [--minutes 20] [--clients 4] [--threads 2] [--skip-peer]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.models import make_random_llama  # noqa: E402
from benchmarks.peers.llama_server import ensure_llama_server  # noqa: E402
from benchmarks.peers.llamacpp import convert_to_gguf  # noqa: E402
from benchmarks.serving import MODEL_DIR, MODEL_NAME, _free_port, _stop, _wait_ready  # noqa: E402

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by",
         "at", "from", "his", "her", "an", "were", "are", "which"]
OVERSIZE_BYTES = 5 << 20  # over Tessera's default 4 MiB body limit
HOSTILE_BODIES: list[bytes] = [
    json.dumps({"model": MODEL_NAME, "prompt": "hi", "seed": 2**64}).encode(),
    json.dumps({"model": MODEL_NAME, "prompt": "hi", "max_tokens": -1}).encode(),
    json.dumps({"model": MODEL_NAME, "prompt": "hi", "n": 10**6}).encode(),
    json.dumps({"model": MODEL_NAME, "prompt": [2**70]}).encode(),
    f'{{"model": "{MODEL_NAME}", "prompt": "hi", "temperature": NaN}}'.encode(),
    b'{"model": "x", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b"{this is not json",
]
# What a client does each turn, with its weight.
ACTIONS = {"stream": 5, "plain": 3, "drop-stream": 2, "abandon": 1, "oversize": 1, "hostile": 2}


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 96)))


class Tally:
    """Outcomes by kind, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}

    def add(self, kind: str, example: str = "") -> None:
        with self.lock:
            self.counts[kind] += 1
            if example and kind not in self.examples:
                self.examples[kind] = example[:200]


def _stream(client: httpx.Client, url: str, body: dict, drop_after: int | None,
            tally: Tally) -> None:  # fmt: skip
    with client.stream("POST", url, json=body | {"stream": True}) as r:
        if r.status_code != 200:
            tally.add(f"http {r.status_code}", r.read().decode(errors="replace"))
            return
        num_chunks = 0
        events = []
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            num_chunks += 1
            if drop_after is not None and num_chunks >= drop_after:
                tally.add("dropped by client")
                return  # leaving the block closes the connection mid-stream
        if not events or events[-1] != "[DONE]":
            tally.add("stream without [DONE]", events[-1] if events else "")
        elif any('"error"' in e for e in events[:-1]):
            tally.add("error event", next(e for e in events if '"error"' in e))
        else:
            tally.add("ok")


def client_loop(base_url: str, seed: int, end_s: float, hang_s: float, tally: Tally) -> None:
    rng = random.Random(seed)
    url = f"{base_url}/v1/completions"
    actions, weights = zip(*ACTIONS.items(), strict=True)
    with httpx.Client(timeout=hang_s) as client:
        while time.monotonic() < end_s:
            action = rng.choices(actions, weights)[0]
            body = {"model": MODEL_NAME, "prompt": _prompt(rng),
                    "max_tokens": rng.randint(8, 48), "temperature": 0}  # fmt: skip
            try:
                if action == "stream":
                    _stream(client, url, body, None, tally)
                elif action == "drop-stream":
                    _stream(client, url, body, rng.randint(1, 6), tally)
                elif action == "plain":
                    r = client.post(url, json=body)
                    tally.add("ok" if r.status_code == 200 else f"http {r.status_code}", r.text)
                elif action == "abandon":
                    try:
                        client.post(url, json=body | {"max_tokens": 48}, timeout=0.3)
                        tally.add("ok")
                    except httpx.TimeoutException:
                        tally.add("abandoned by client")
                elif action == "oversize":
                    try:
                        r = client.post(url, content=b"x" * OVERSIZE_BYTES)
                        tally.add(f"oversize: http {r.status_code}", r.text)
                    except httpx.TransportError:
                        tally.add("oversize: connection closed")
                else:
                    r = client.post(url, content=rng.choice(HOSTILE_BODIES),
                                    headers={"content-type": "application/json"})  # fmt: skip
                    tally.add(f"hostile: http {r.status_code}", r.text)
            except httpx.TimeoutException:
                tally.add("HANG", action)
            except httpx.TransportError as e:
                tally.add("broken connection", f"{action}: {e!r}")


def _tree_rss_bytes(pid: int) -> int:
    """RSS of a process and all its descendants (Linux /proc)."""
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _metric(base_url: str, names: tuple[str, ...]) -> float | None:
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=10).text
    except httpx.TransportError:
        return None
    for line in text.splitlines():
        for name in names:
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


KV_METRICS = ("tessera:kv_cache_usage_perc", "llamacpp:kv_cache_usage_ratio")
RUNNING_METRICS = ("tessera:num_requests_running", "llamacpp:requests_processing")


def soak(name: str, command: list[str], args: argparse.Namespace, log: Any) -> dict[str, Any]:
    port = int(command[command.index("--port") + 1])
    base_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    print(f"{name}: starting ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    try:
        _wait_ready(proc, base_url)
        warm = {"model": MODEL_NAME, "prompt": "warm up", "max_tokens": 8}
        for _ in range(2):
            httpx.post(f"{base_url}/v1/completions", json=warm, timeout=120)
        rss_start = _tree_rss_bytes(proc.pid)
        tally = Tally()
        end_s = time.monotonic() + args.minutes * 60
        threads = [
            threading.Thread(target=client_loop,
                             args=(base_url, args.seed + i, end_s, args.hang_s, tally))
            for i in range(args.clients)
        ]  # fmt: skip
        print(f"{name}: soaking for {args.minutes} min ...", file=sys.stderr, flush=True)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Idle: every abandoned request must be gone from the engine.
        deadline_s = time.monotonic() + 60
        while (_metric(base_url, RUNNING_METRICS) or 0) > 0 and time.monotonic() < deadline_s:
            time.sleep(0.5)
        healthy = httpx.get(f"{base_url}/health", timeout=10).status_code == 200
        kv_in_use = _metric(base_url, KV_METRICS)
        running = _metric(base_url, RUNNING_METRICS)
        rss_end = _tree_rss_bytes(proc.pid)
    finally:
        _stop(proc)
    return {"system": name, "counts": dict(tally.counts), "examples": tally.examples,
            "rss_start_mib": rss_start / 2**20, "rss_end_mib": rss_end / 2**20,
            "kv_in_use": kv_in_use, "running": running, "healthy": healthy}  # fmt: skip


BAD_KINDS = ("HANG", "broken connection", "error event", "stream without [DONE]")


def _is_bad(kind: str) -> bool:
    """An outcome no request may get: a server error, a hang, a broken stream or connection."""
    return kind in BAD_KINDS or kind.split("http ")[-1].startswith("5")


def _num_bad(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if _is_bad(k))


def format_table(rows: list[dict[str, Any]], minutes: float, clients: int) -> str:
    kinds = sorted({k for r in rows for k in r["counts"]})
    width = max(len(k) for k in [*kinds, "RSS after warm-up / end (MiB)"]) + 2
    head = f"{'':<{width}}" + "".join(f"{r['system']:>16}" for r in rows)
    lines = [f"{minutes:g} min, {clients} clients", head, "-" * len(head)]
    for k in kinds:
        lines.append(f"{k:<{width}}" + "".join(f"{r['counts'].get(k, 0):>16}" for r in rows))
    lines.append(f"{'requests':<{width}}" + "".join(f"{sum(r['counts'].values()):>16}"
                                                    for r in rows))  # fmt: skip
    lines.append(f"{'never-acceptable outcomes':<{width}}"
                 + "".join(f"{_num_bad(r['counts']):>16}" for r in rows))  # fmt: skip
    lines.append(f"{'RSS after warm-up / end (MiB)':<{width}}" + "".join(
        f"{r['rss_start_mib']:>9.0f} /{r['rss_end_mib']:>5.0f}" for r in rows))
    for label, key, fmt in (("requests running when idle", "running", ".0f"),
                            ("KV in use when idle", "kv_in_use", ".4f")):  # fmt: skip
        values = ["n/a" if r[key] is None else format(r[key], fmt) for r in rows]
        lines.append(f"{label:<{width}}" + "".join(f"{v:>16}" for v in values))
    lines.append(f"{'healthy at the end':<{width}}"
                 + "".join(f"{str(r['healthy']):>16}" for r in rows))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-s", type=float, default=120.0,
                        help="a request with no answer for this long counts as a hang")
    parser.add_argument("--model-dir", default=str(MODEL_DIR))
    parser.add_argument("--llama-server", default=None, metavar="PATH")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--log", default=None, help="file for the servers' output")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.hang_s <= 0:
        parser.error("--minutes, --clients and --hang-s must be positive")
    if not (Path(args.model_dir) / "config.json").is_file():
        make_random_llama(args.model_dir)
    systems = [("tessera", [
        sys.executable, "-m", "tessera.cli", "serve", args.model_dir, "--port", str(_free_port()),
        "--served-model-name", MODEL_NAME, "--dtype", "float32", "--device", "cpu",
        "--threads", str(args.threads), "--max-num-seqs", "16", "--kv-cache-memory", str(1 << 30),
    ])]  # fmt: skip
    if not args.skip_peer:
        server = args.llama_server or str(ensure_llama_server())
        gguf = convert_to_gguf(args.model_dir, str(Path(args.model_dir) / "model-f32.gguf"))
        systems.append(("llama-server", [
            server, "-m", gguf, "--port", str(_free_port()), "--host", "127.0.0.1",
            "--threads", str(args.threads), "--threads-batch", str(args.threads),
            "--parallel", str(args.clients), "--cont-batching", "--metrics",
            "--ctx-size", str(512 * args.clients), "--alias", MODEL_NAME,
        ]))  # fmt: skip
    log = open(args.log, "a") if args.log else subprocess.DEVNULL  # noqa: SIM115
    try:
        rows = [soak(name, cmd, args, log) for name, cmd in systems]
    finally:
        if args.log:
            log.close()  # type: ignore[union-attr]
    print(format_table(rows, args.minutes, args.clients))
    for r in rows:
        for kind, example in r["examples"].items():
            if _is_bad(kind):
                print(f"  {r['system']} {kind}: {example}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    tessera = rows[0]
    ok = _num_bad(tessera["counts"]) == 0 and tessera["kv_in_use"] == 0 and tessera["healthy"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
