"""Offline throughput: Tessera vs transformers ``generate`` vs llama.cpp, one workload, one run.

Model: a ~110M-parameter random Llama (hidden 768, 12 layers, vocab 32000), float32.
Workload: seeded requests with prompts of 32..1024 tokens and outputs of 16..256 tokens, every
request emitting exactly its output count (EOS ignored). Each engine runs in a fresh process
with the same number of threads and the same OpenMP wait policy: the runtime's default unless
``--omp-wait-policy`` is given (PASSIVE is fairer on a busy machine, where spinning threads
collapse; ACTIVE or the default is faster on a quiet one; see benchmarks/peers).

    python benchmarks/offline_throughput.py [--num-requests 64] [--threads 2] [--json out.json]

Peers: transformers ``generate`` (static batches of ``--hf-batch-size``, left-padded, greedy)
and llama.cpp (llama-cpp-python, continuous batching with ``--parallel`` slots); a peer whose
package is missing is reported as skipped (``make bench-deps`` installs llama-cpp-python).
Also measured: batch-1 decode speed (prompt of 32 tokens, 128 decoded tokens). Tessera runs
twice: with its default float32 KV cache, and with a float16 KV cache (``kv_cache_dtype``),
which is what llama.cpp uses by default; weights and activations are float32 in every run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.peers import CpuMeter, Workload, make_workload, summarize  # noqa: E402

MODEL_DIR = REPO_ROOT / ".bench" / "models" / "llama-100m"
BATCH1_PROMPT = list(range(300, 332))
BATCH1_OUTPUT_TOKENS = 128


def tessera_batched(
    model_dir: str, requests: Workload, n_threads: int, kv_cache_dtype: str = "auto"
) -> dict[str, Any]:
    from tessera import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu", num_threads=n_threads,
              kv_cache_memory=4 << 30, max_num_batched_tokens=2048, kv_cache_dtype=kv_cache_dtype)
    llm.generate([[300] * 16], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    meter = CpuMeter(n_threads)
    start_s = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params, use_tqdm=False)
    wall_s = time.perf_counter() - start_s
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert num_out == sum(n for _, n in requests), "every request must emit its output count"
    return summarize(wall_s, sum(len(p) for p, _ in requests), num_out,
                     num_preemptions=llm.engine.scheduler.num_preemptions, **meter.stop())


def tessera_batch1(model_dir: str, n_threads: int, kv_cache_dtype: str = "auto") -> dict[str, Any]:
    from tessera import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu", num_threads=n_threads,
              kv_cache_memory=1 << 30, kv_cache_dtype=kv_cache_dtype)
    engine = llm.engine
    llm.generate([[300] * 16], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    engine.add_request("b1", BATCH1_PROMPT,
                       SamplingParams(temperature=0.0, max_tokens=BATCH1_OUTPUT_TOKENS + 1,
                                      ignore_eos=True))
    engine.step()  # prefill; samples the first token
    start_s = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    decode_s = time.perf_counter() - start_s
    return {"decode_tokens_per_s": steps / decode_s, "decode_s": decode_s}


def hf_batched(model_dir: str, requests: Workload, n_threads: int, batch_size: int) -> dict:
    from benchmarks.peers.hf import bench_transformers

    return bench_transformers(model_dir, requests, batch_size, n_threads)


def llamacpp_batched(model_dir: str, requests: Workload, n_threads: int, parallel: int) -> dict:
    from benchmarks.peers import llamacpp

    llamacpp.ensure_llamacpp()
    gguf = llamacpp.convert_to_gguf(model_dir, str(Path(model_dir) / "model-f32.gguf"))
    return llamacpp.bench_batched(gguf, requests, n_threads, parallel)


def llamacpp_batch1(model_dir: str, n_threads: int) -> dict:
    from benchmarks.peers import llamacpp

    llamacpp.ensure_llamacpp()
    gguf = llamacpp.convert_to_gguf(model_dir, str(Path(model_dir) / "model-f32.gguf"))
    return llamacpp.bench_decode_batch1(gguf, BATCH1_PROMPT, BATCH1_OUTPUT_TOKENS, n_threads)


def set_wait_policy(policy: str | None) -> None:
    """Apply one OpenMP wait policy to every engine process started after this call."""
    if policy is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = policy


def _child(queue: Any, fn: Callable[..., dict], args: tuple) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except Exception as e:  # reported as a skipped row, not a crash of the whole benchmark
        queue.put(("error", f"{type(e).__name__}: {e}".splitlines()[0]))


def isolated(fn: Callable[..., dict], *args: Any) -> dict[str, Any]:
    """Run ``fn`` in a fresh process, so engines never share thread pools or memory."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    while True:
        try:
            status, value = queue.get(timeout=1.0)
            break
        except queue_mod.Empty:
            # A child that dies without reporting (killed, crashed in native code) must not
            # leave the benchmark waiting forever.
            if not proc.is_alive():
                return {"error": f"engine process exited with code {proc.exitcode}"}
    proc.join()
    return value if status == "ok" else {"error": value}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=32, help="llama.cpp parallel slots")
    parser.add_argument("--peers", default="hf,llamacpp",
                        help="comma list of hf, llamacpp; or 'none'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write all results to this file")
    parser.add_argument("--omp-wait-policy", choices=["ACTIVE", "PASSIVE"], default=None,
                        help="OpenMP wait policy for every engine (default: leave unset)")
    args = parser.parse_args(argv)
    set_wait_policy(args.omp_wait_policy)

    from benchmarks.models import make_random_llama

    model_dir = make_random_llama(str(MODEL_DIR))
    requests = make_workload(args.num_requests, seed=args.seed)
    peers = set() if args.peers == "none" else set(args.peers.split(","))
    t = args.threads
    results: dict[str, dict[str, Any]] = {
        "tessera": isolated(tessera_batched, model_dir, requests, t),
        "tessera f16-kv": isolated(tessera_batched, model_dir, requests, t, "float16"),
    }
    if "hf" in peers:
        results["transformers"] = isolated(hf_batched, model_dir, requests, t, args.hf_batch_size)
    if "llamacpp" in peers:
        results["llama.cpp"] = isolated(llamacpp_batched, model_dir, requests, t, args.parallel)
    batch1 = {
        "tessera": isolated(tessera_batch1, model_dir, t),
        "tessera f16-kv": isolated(tessera_batch1, model_dir, t, "float16"),
    }
    if "llamacpp" in peers:
        batch1["llama.cpp"] = isolated(llamacpp_batch1, model_dir, t)

    num_prompt = sum(len(p) for p, _ in requests)
    num_out = sum(n for _, n in requests)
    policy = args.omp_wait_policy or "default"
    print(f"\nworkload: {len(requests)} requests, {num_prompt} prompt + {num_out} output tokens; "
          f"float32; {t} threads; OpenMP wait policy {policy}")
    base = results["tessera"].get("output_tokens_per_s")
    print(f"{'engine':<14}{'output tok/s':>14}{'total tok/s':>14}{'wall s':>10}"
          f"{'cpu share':>11}{'Tessera x':>11}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<14}  skipped: {r['error']}")
            continue
        ratio = base / r["output_tokens_per_s"] if base else float("nan")
        print(f"{name:<14}{r['output_tokens_per_s']:>14.1f}{r['total_tokens_per_s']:>14.1f}"
              f"{r['wall_s']:>10.1f}{r.get('cpu_share', float('nan')):>11.2f}{ratio:>11.2f}")
    print(f"\nbatch-1 decode ({len(BATCH1_PROMPT)}-token prompt, {BATCH1_OUTPUT_TOKENS} tokens):")
    for name, r in batch1.items():
        if "error" in r:
            print(f"{name:<14}  skipped: {r['error']}")
        else:
            print(f"{name:<14}{r['decode_tokens_per_s']:>14.1f} tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"batched": results, "batch1": batch1}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
