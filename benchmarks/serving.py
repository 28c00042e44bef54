"""Serving benchmark: Tessera's server vs llama.cpp's server, same model, same load, one run.

Model: the ~110M-parameter random Llama of ``benchmarks/models.py`` (float32; llama.cpp gets
the same weights converted to an f32 GGUF). Both servers get the same thread count and are
loaded by the same client, ``tessera bench serve``: streaming ``/v1/completions`` requests,
greedy, at each concurrency (1 and 32 by default), all sent at once and capped at that many in
flight. Prompts are text (llama-cpp-python's server takes no token-id prompts) built from the
model tokenizer's whole-word pieces, so both servers see identical prompts.

    python benchmarks/serving.py [--concurrency 1 32] [--num-prompts N] [--threads 2]
        [--input-len 128] [--output-len 64] [--json out.json]

The peer (``--peer llama-server``, the default) is llama.cpp's C++ ``llama-server`` with
``--parallel`` equal to the concurrency and ``--cont-batching``: multi-slot continuous batching.
llama-cpp-python ships no binary of it, so it is built once from the llama-cpp-python source
distribution (``benchmarks/peers/llama_server.py``; ``--llama-server PATH`` uses a given one).
``--peer llama-cpp-py`` runs ``python -m llama_cpp.server`` instead (its ``[server]`` extra).
That server has no parallel slots: every request takes a global lock on the one ``Llama``
object, so concurrent requests run one after another; there is no ``n_parallel`` setting
(``n_seq_max`` is only used for embeddings). It is run with ``--interrupt_requests False``,
since by default a new request cuts the one streaming.

Each server starts fresh for each concurrency, is warmed with two requests, and is stopped
with SIGINT afterwards. EOS is not ignored (llama-cpp-python has no ``ignore_eos``); both
generate the same greedy tokens from the same weights, and the table counts the tokens each
actually streamed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
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

from benchmarks.models import make_random_llama  # noqa: E402
from benchmarks.peers.llama_server import ensure_llama_server  # noqa: E402
from benchmarks.peers.llamacpp import convert_to_gguf, ensure_llamacpp  # noqa: E402

MODEL_DIR = REPO_ROOT / ".bench" / "models" / "llama-100m"
MODEL_NAME = "bench-model"
COLUMNS = ("output_throughput", "p50_ttft_ms", "p50_tpot_ms", "mean_tpot_ms", "num_output_tokens")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tessera_command(model_dir: str, port: int, args: argparse.Namespace, slots: int) -> list[str]:
    return [
        sys.executable, "-m", "tessera.cli", "serve", model_dir, "--port", str(port),
        "--served-model-name", MODEL_NAME, "--dtype", "float32", "--device", "cpu",
        "--threads", str(args.threads), "--max-num-seqs", str(max(slots, 1)),
        "--kv-cache-memory", str(2 << 30),
    ]  # fmt: skip


def llamacpp_command(gguf: str, port: int, args: argparse.Namespace, slots: int) -> list[str]:
    n_ctx = args.input_len * 2 + args.output_len + 64  # the longest request, with headroom
    if args.llama_server:
        return [
            args.llama_server, "-m", gguf, "--port", str(port), "--host", "127.0.0.1",
            "--threads", str(args.threads), "--threads-batch", str(args.threads),
            "--parallel", str(slots), "--cont-batching", "--ctx-size", str(n_ctx * slots),
            "--alias", MODEL_NAME,
        ]  # fmt: skip
    return [
        sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
        "--host", "127.0.0.1", "--model_alias", MODEL_NAME,
        "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
        "--n_ctx", str(n_ctx), "--n_batch", "512", "--interrupt_requests", "False",
    ]  # fmt: skip


def _wait_ready(proc: subprocess.Popen, base_url: str, timeout_s: float = 300.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} while starting")
        try:
            if httpx.get(f"{base_url}/v1/models", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _bench(base_url: str, args: argparse.Namespace, concurrency: int, num_prompts: int,
           log: Any) -> dict[str, Any]:  # fmt: skip
    """One ``tessera bench serve`` run; its summary dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-m", "tessera.cli", "bench", "serve", "--base-url", base_url,
            "--model", MODEL_NAME, "--dataset", "random", "--num-prompts", str(num_prompts),
            "--random-input-len", str(args.input_len), "--random-output-len",
            str(args.output_len), "--random-range-ratio", "0.25",
            "--random-vocab-size", "100000", "--text-prompts", args.model_dir,
            "--max-concurrency", str(concurrency), "--seed", str(args.seed),
            "--json", str(out), "--no-progress",
        ]  # fmt: skip
        proc = subprocess.run(cmd, stdout=log, stderr=log)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"tessera bench serve failed (exit {proc.returncode})")
        return dict(json.loads(out.read_text())["summary"])


def run_system(name: str, command: list[str], args: argparse.Namespace, concurrency: int,
               log: Any) -> dict[str, Any]:  # fmt: skip
    port = int(command[command.index("--port") + 1])
    base_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_WAIT_POLICY": args.omp_wait_policy, "TOKENIZERS_PARALLELISM": "false"}
    print(f"  {name}: starting server (concurrency {concurrency}) ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    try:
        _wait_ready(proc, base_url)
        warm = argparse.Namespace(**{**vars(args), "output_len": 4})
        _bench(base_url, warm, 1, 2, log)
        num_prompts = args.num_prompts or max(8, 4 * concurrency)
        summary = _bench(base_url, args, concurrency, num_prompts, log)
    finally:
        _stop(proc)
    if summary["num_failed"]:
        raise RuntimeError(f"{name}: {summary['num_failed']} requests failed: {summary.get('errors')}")
    return summary


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'concurrency':>11} {'system':<16} {'out tok/s':>10} {'TTFT p50 ms':>12} "
            f"{'TPOT p50 ms':>12} {'TPOT mean ms':>13} {'out tokens':>11}")  # fmt: skip
    lines = [head, "-" * len(head)]
    by_conc: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_conc.setdefault(r["concurrency"], {})[r["system"]] = r["summary"]
    for conc, systems in sorted(by_conc.items()):
        for system, s in systems.items():
            lines.append(
                f"{conc:>11} {system:<16} {s['output_throughput']:>10.1f} {s['p50_ttft_ms']:>12.1f} "
                f"{s['p50_tpot_ms']:>12.1f} {s['mean_tpot_ms']:>13.1f} {s['num_output_tokens']:>11}"
            )
        if len(systems) == 2:
            t, p = systems["tessera"], next(v for k, v in systems.items() if k != "tessera")
            lines.append(
                f"{conc:>11} {'tessera / peer':<16} "
                f"{t['output_throughput'] / max(p['output_throughput'], 1e-9):>9.2f}x "
                f"{t['p50_ttft_ms'] / max(p['p50_ttft_ms'], 1e-9):>11.2f}x "
                f"{t['p50_tpot_ms'] / max(p['p50_tpot_ms'], 1e-9):>11.2f}x"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="requests per concurrency (default: max(8, 4 x concurrency))")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", default=str(MODEL_DIR),
                        help="HF model directory (built as the ~110M random Llama if absent)")
    parser.add_argument("--peer", default="llama-server", choices=["llama-server", "llama-cpp-py"],
                        help="llama.cpp's C++ server with parallel slots (built from the "
                        "llama-cpp-python sdist on first use) or llama-cpp-python's own server")
    parser.add_argument("--llama-server", default=None, metavar="PATH",
                        help="a llama-server binary to use instead of building one")
    parser.add_argument("--skip-peer", action="store_true", help="only run Tessera")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"])
    parser.add_argument("--log", default=None, help="file for both servers' output")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    if not (Path(args.model_dir) / "config.json").is_file():
        print(f"building the benchmark model in {args.model_dir} ...", file=sys.stderr)
        make_random_llama(args.model_dir)
    gguf = None
    if not args.skip_peer:
        if args.peer == "llama-server" and not args.llama_server:
            try:
                args.llama_server = str(ensure_llama_server())
            except RuntimeError as e:
                print(f"serving benchmark: {e}", file=sys.stderr)
                return 2
        if not args.llama_server:
            try:
                ensure_llamacpp()
                import llama_cpp.server.app  # noqa: F401  (the [server] extra's dependencies)
            except (RuntimeError, ImportError) as e:
                print(f"serving benchmark: llama.cpp peer unavailable ({e}); run make bench-deps",
                      file=sys.stderr)  # fmt: skip
                return 2
        gguf = convert_to_gguf(args.model_dir, str(Path(args.model_dir) / "model-f32.gguf"))
    peer = "llama-server" if args.llama_server else "llama-cpp-py"

    rows = []
    log = open(args.log, "a") if args.log else subprocess.DEVNULL  # noqa: SIM115
    try:
        for conc in args.concurrency:
            port = _free_port()
            cmd = tessera_command(args.model_dir, port, args, conc)
            rows.append({"system": "tessera", "concurrency": conc,
                         "summary": run_system("tessera", cmd, args, conc, log)})  # fmt: skip
            if gguf:
                cmd = llamacpp_command(gguf, _free_port(), args, conc)
                rows.append({"system": peer, "concurrency": conc,
                             "summary": run_system(peer, cmd, args, conc, log)})  # fmt: skip
    finally:
        if args.log:
            log.close()  # type: ignore[union-attr]
    print(f"\nmodel {args.model_dir}, {args.threads} threads, prompts ~{args.input_len} tokens "
          f"(+-25%), up to {args.output_len} output tokens, greedy, streamed")  # fmt: skip
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
